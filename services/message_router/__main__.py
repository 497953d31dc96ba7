from chatlib.runner import run

from services.message_router.service import MessageRouter

run(MessageRouter)
