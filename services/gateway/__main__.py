from chatlib.runner import run

from services.gateway.service import Gateway

run(Gateway)
