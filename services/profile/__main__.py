from chatlib.runner import run

from services.profile.service import ProfileService

run(ProfileService)
