from chatlib.runner import run

from services.persistence.service import Persistence

run(Persistence)
