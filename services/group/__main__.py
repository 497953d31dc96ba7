from chatlib.runner import run

from services.group.service import GroupService

run(GroupService)
