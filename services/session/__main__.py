from chatlib.runner import run

from services.session.service import Session

run(Session)
