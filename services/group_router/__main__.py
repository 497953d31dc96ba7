from chatlib.runner import run

from services.group_router.service import GroupRouter

run(GroupRouter)
