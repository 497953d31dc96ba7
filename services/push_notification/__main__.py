from chatlib.runner import run

from services.push_notification.service import PushNotification

run(PushNotification)
