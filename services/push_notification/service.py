"""push-notification: PushRequests to FCM (or to the recording sink), every outcome recorded.

It keeps its own projection of devices and push tokens from USER_EVENTS,
asks persistence for a user's muted conversations (cached briefly) and
collapses bursts per device and conversation. Each poll is handled as one
batch: one read of devices, names and already-recorded outcomes, one
send_each to FCM, one insert of outcomes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from chatlib.schemas import Event, GroupPushRequest, PushRequest, now_ms
from chatlib.service import Dependency, Service, ServiceConfig, Storage, consume
from chatlib.topics import PUSH_REQUESTS, USER_EVENTS
from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from . import logic
from .clients import FcmSender, MuteClient, RecordingSender, Sender
from .storage import PushStore

logger = logging.getLogger(__name__)

DEFAULT_PERSISTENCE_URL = "http://127.0.0.1:8103"


class PushConfig(ServiceConfig):
    """Settings of push-notification (``PUSH_NOTIFICATION_*``)."""

    model_config = SettingsConfigDict(env_prefix="PUSH_NOTIFICATION_", extra="ignore")
    port: int = 8107
    # Firebase service-account JSON; empty: the recording sink is used.
    credentials_file: str = ""
    # A burst for one device and conversation within this many seconds is one notification.
    collapse_s: float = Field(2.0, ge=0)
    # Persistence's internal HTTP address (GET /internal/mutes/{user_id}); empty: the default.
    persistence_url: str = DEFAULT_PERSISTENCE_URL
    # Seconds a user's mute list is cached, and the timeout of fetching it.
    mute_cache_s: float = Field(5.0, ge=0)
    mute_timeout_s: float = Field(1.0, gt=0)

    @field_validator("persistence_url")
    @classmethod
    def _default_url(cls, v: str) -> str:
        return v.strip() or DEFAULT_PERSISTENCE_URL

    @field_validator("credentials_file")
    @classmethod
    def _credentials_exist(cls, v: str) -> str:
        if v.strip() and not Path(v.strip()).is_file():
            raise ValueError(f"no such file: {v}")
        return v.strip()


class SenderDependency(Dependency[Sender]):
    """FCM when a credentials file is configured, else the recording sink."""

    def setup(self, service: Service) -> Sender:
        path = getattr(service.config, "credentials_file", "")
        if path:
            logger.info("push: sending through FCM")
            return FcmSender.from_credentials_file(path)
        logger.info("push: no FCM credentials, recording what would be sent")
        return RecordingSender()


class MuteDependency(Dependency[MuteClient]):
    """Persistence's mute list, cached."""

    def setup(self, service: Service) -> MuteClient:
        cfg: Any = service.config
        return MuteClient(cfg.persistence_url, cfg.mute_cache_s, cfg.mute_timeout_s)


class PushNotification(Service):
    """Turns push requests into notifications for the user's offline devices."""

    name = "push-notification"
    config_class = PushConfig
    config: PushConfig

    store = Storage(PushStore)
    sender = SenderDependency()
    mutes = MuteDependency()

    def __init__(self, config: PushConfig, **overrides: Any):
        super().__init__(config, **overrides)
        self.collapser = logic.Collapser(int(config.collapse_s * 1000))

    # -- Kafka ------------------------------------------------------------

    @consume(USER_EVENTS, group="push-notification", batch=True)
    def on_user_events(self, events: list[Event]) -> None:
        """Keep the projection of devices, push tokens and sender names."""
        self.store.set_user_events(events)

    # Notifications need not be quick (FCM takes longer still): a burst is one batch.
    @consume(PUSH_REQUESTS, group="push-notification", batch=True, linger_ms=500)
    def on_push_requests(self, events: list[Event]) -> None:
        """Notify each requested user's offline devices that have a token; record every outcome."""
        requests = [ev for ev in events if isinstance(ev, PushRequest)]
        requests += [r for ev in events if isinstance(ev, GroupPushRequest) for r in ev.requests()]
        if not requests:
            return
        now = now_ms()
        users = sorted({r.user_id for r in requests})
        devices = self.store.get_push_devices(users)
        candidates = [logic.outcome_id(r.message_id, d.device_id) for r in requests for d in devices.get(r.user_id, [])]
        if not candidates:
            return
        done = self.store.get_outcome_ids(candidates)
        names = self.store.get_names(sorted({r.sender for r in requests}))
        to_send: list[logic.Notification] = []
        outcomes: list[logic.Outcome] = []
        for req in requests:
            user_devices = devices.get(req.user_id, [])
            if not any(d.device_id not in req.exclude_devices for d in user_devices):
                continue
            muted = req.conversation in self.mutes.muted(req.user_id)
            notes, decided = logic.plan(req, user_devices, muted, self.collapser, done, names.get(req.sender, ""), now)
            to_send.extend(notes)
            outcomes.extend(decided)
            # A request repeated inside the batch finds these and is skipped.
            done.update(o.id for o in decided)
            done.update(logic.outcome_id(n.message_id, n.device_id) for n in notes)
        if to_send:
            statuses = self.sender.send(to_send)
            for note, status in zip(to_send, statuses, strict=True):
                if status == "unregistered":
                    self.store.delete_token(note.user_id, note.device_id, note.token, now)
                outcomes.append(logic.outcome(note, note.device_id, status, now))
        self.store.set_outcomes(outcomes)
        self.collapser.prune(max(r.ts for r in requests))
        logger.debug("push batch: %d requests, %d outcomes", len(requests), len(outcomes))
