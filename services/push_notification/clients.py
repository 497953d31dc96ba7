"""Outward clients of push-notification: the FCM sender, the recording sink, persistence's mute list.

A sender takes notifications and returns one status per notification:
``sent`` / ``unregistered`` / ``failed`` for FCM, ``recorded`` for the sink.
Neither logs a push token nor the preview text.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from typing import Any, Protocol

import firebase_admin
import requests
from firebase_admin import credentials, exceptions, messaging

from .logic import Notification, Status

logger = logging.getLogger(__name__)

#: FCM's limit for one send_each call.
FCM_BATCH = 500


class Sender(Protocol):
    def send(self, notes: list[Notification]) -> list[Status]: ...


class RecordingSender:
    """Used without FCM credentials: nothing leaves the machine, every push is recorded."""

    def send(self, notes: list[Notification]) -> list[Status]:
        for n in notes:
            logger.info(
                "push recorded (no FCM credentials): user %s device %s conversation %s message %s",
                n.user_id,
                n.device_id,
                n.conversation,
                n.message_id,
            )
        return ["recorded"] * len(notes)


class FcmSender:
    """Firebase Cloud Messaging through firebase-admin (HTTP v1 API)."""

    def __init__(self, app: firebase_admin.App):
        self.app = app

    @classmethod
    def from_credentials_file(cls, path: str, app_name: str = "chat-push") -> FcmSender:
        """An app on a service-account JSON file (its project id comes from the file)."""
        cred = credentials.Certificate(path)
        return cls(firebase_admin.initialize_app(cred, name=app_name))

    def send(self, notes: list[Notification]) -> list[Status]:
        statuses: list[Status] = []
        for start in range(0, len(notes), FCM_BATCH):
            statuses.extend(self._send_chunk(notes[start : start + FCM_BATCH]))
        return statuses

    def _send_chunk(self, notes: list[Notification]) -> list[Status]:
        with warnings.catch_warnings():
            # firebase-admin 7.7 deprecates the name ``token`` in favour of installation ids (``fid``);
            # the push tokens apps register are FCM registration tokens, which the v1 API still takes
            # as ``message.token``. Building messages never yields, so this is safe under gevent.
            warnings.filterwarnings("ignore", message="Message.token is deprecated", category=DeprecationWarning)
            msgs = [
                messaging.Message(
                    token=n.token,
                    notification=messaging.Notification(title=n.title, body=n.body),
                    data=n.data(),
                )
                for n in notes
            ]
        try:
            batch = messaging.send_each(msgs, app=self.app)
        except exceptions.FirebaseError as exc:
            logger.warning("FCM batch of %d failed: %s", len(notes), exc.__class__.__name__)
            return ["failed"] * len(notes)
        out: list[Status] = []
        for n, resp in zip(notes, batch.responses, strict=True):
            if resp.success:
                out.append("sent")
            elif isinstance(resp.exception, messaging.UnregisteredError | messaging.SenderIdMismatchError):
                logger.info("push token of user %s device %s is no longer valid", n.user_id, n.device_id)
                out.append("unregistered")
            else:
                name = resp.exception.__class__.__name__ if resp.exception else "unknown"
                logger.warning("push to user %s device %s failed: %s", n.user_id, n.device_id, name)
                out.append("failed")
        return out


class MuteClient:
    """Conversations a user muted, from persistence's GET /internal/mutes/{user_id}, cached for ``ttl_s``.

    When persistence cannot answer, nothing counts as muted (a push too many
    beats a missed one) and the failure is cached briefly too, so a slow
    persistence does not slow every batch.
    """

    def __init__(self, base_url: str, ttl_s: float = 5.0, timeout_s: float = 1.0):
        self.base_url = base_url.rstrip("/")
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.http = requests.Session()
        self._cache: dict[str, tuple[float, frozenset[str]]] = {}
        self._lock = threading.Lock()

    def muted(self, user_id: str) -> frozenset[str]:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(user_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        value = self._fetch(user_id)
        with self._lock:
            if len(self._cache) > 50_000:
                self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
            self._cache[user_id] = (now + self.ttl_s, value)
        return value

    def _fetch(self, user_id: str) -> frozenset[str]:
        url = f"{self.base_url}/internal/mutes/{requests.utils.quote(user_id, safe='')}"
        try:
            resp = self.http.get(url, timeout=self.timeout_s)
            if resp.status_code == 404:
                return frozenset()
            resp.raise_for_status()
            body: Any = resp.json()
            convs = body.get("conversations", []) if isinstance(body, dict) else []
            return frozenset(c for c in convs if isinstance(c, str))
        except (requests.RequestException, ValueError) as exc:
            logger.warning("mute list of user %s unavailable (%s); not muting", user_id, exc.__class__.__name__)
            return frozenset()
