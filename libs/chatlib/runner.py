"""Process entry point shared by every service: ``run(MyService)``.

Import this module first in a service's ``__main__``: it applies gevent's
monkey patching before anything else loads. The steps raise; only the
runner exits: 2 for bad configuration, 3 when Kafka or MongoDB cannot be
reached at start (the worker fails to boot and gunicorn's master exits with
it). The HTTP side is gunicorn with one gevent worker (so a WebSocket does not
pin a thread); clients are made inside that worker, after the fork.
"""

from gevent import monkey

monkey.patch_all()

import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

from gunicorn.app.base import BaseApplication  # noqa: E402

from .config import ConfigError, load_config  # noqa: E402
from .kafka import InfrastructureUnavailable, wait_for_broker  # noqa: E402
from .logs import setup_logging  # noqa: E402
from .mongo import connect  # noqa: E402
from .oslimits import raise_open_file_limit  # noqa: E402
from .service import Service, ServiceConfig  # noqa: E402

logger = logging.getLogger(__name__)


class _Gunicorn(BaseApplication):  # type: ignore[misc]
    def __init__(self, service_cls: type[Service], config: ServiceConfig, options: dict[str, Any]):
        self.service_cls = service_cls
        self.service_config = config
        self.options = options
        self.service: Service | None = None
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        # Runs inside the worker, after fork: Kafka and Mongo clients are made here.
        setup_logging(self.service_cls.name, self.service_config.log_level)
        service = self.service_cls(self.service_config)
        try:
            probe(self.service_config)
            service.setup()
            service.start()
        except InfrastructureUnavailable as exc:
            logger.error("cannot start: %s", exc)
            print(f"{self.service_cls.name}: cannot start: {exc}", file=sys.stderr, flush=True)
            sys.exit(3)  # gunicorn's "worker failed to boot": the master exits with 3 too
        self.service = service
        return service.create_app()


def probe(config: ServiceConfig) -> None:
    """Fail fast when Kafka or MongoDB is unreachable."""
    wait_for_broker(config.kafka_bootstrap_servers, config.startup_timeout_s)
    connect(config, "probe").close()


def _raise_open_file_limit(connections: int) -> None:
    """Room for every connection plus the process's own files; warn when the hard limit is lower."""
    limit = raise_open_file_limit(connections + 1024)
    if limit < connections:
        logger.warning("open-file limit %d is below %d connections; raise `ulimit -n`", limit, connections)


def run(service_cls: type[Service]) -> None:
    """Load config, check infrastructure, serve under gunicorn; exits non-zero on failure."""
    setup_logging(service_cls.name, "INFO")
    try:
        config = load_config(service_cls.config_class)
        setup_logging(service_cls.name, config.log_level)
    except ConfigError as exc:
        logger.error("%s", exc)
        print(f"{service_cls.name}: {exc}", file=sys.stderr)
        sys.exit(2)

    def worker_exit(server: Any, worker: Any) -> None:
        svc = app.service
        if svc is None:
            return  # the worker failed to boot: keep its exit code (3) so the master halts
        svc.stop()
        # Everything is committed and closed: skip interpreter teardown (seconds of
        # garbage collection over a large heap) and let the master exit at once.
        logging.shutdown()
        os._exit(0)

    options = {
        "bind": f"{config.host}:{config.port}",
        "workers": 1,
        "worker_class": "gevent",
        "worker_connections": int(getattr(config, "worker_connections", 1000)),
        # Connects queued before the worker accepts them (a reconnect storm brings thousands
        # at once through Nginx); the kernel caps it at net.core.somaxconn (4096 by default).
        "backlog": 4096,
        "graceful_timeout": int(getattr(config, "graceful_timeout_s", 10)),
        "timeout": 60,
        "accesslog": None,
        "errorlog": "-",
        "loglevel": "warning",
        "proc_name": f"chat-{service_cls.name}",
        "worker_exit": worker_exit,
    }
    _raise_open_file_limit(int(getattr(config, "worker_connections", 1000)))
    app = _Gunicorn(service_cls, config, options)
    logger.info("%s listening on %s:%s", service_cls.name, config.host, config.port)
    app.run()
