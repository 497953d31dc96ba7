"""The whole system on one machine: infrastructure, topics, every service, Nginx.

One table (:data:`SERVICES`) says which services exist, their module and
port. :class:`Stack` starts them as real processes and stops every one of
them; ``make run``, ``make infra`` and the test fixtures all use it.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import requests

from .infra import (
    ROOT,
    NginxSettings,
    Proc,
    free_port,
    kafka_proc,
    mongo_proc,
    nginx_proc,
    port_open,
    wait_until,
)
from .supervisor import Policy, Process, Recipe, Supervisor

logger = logging.getLogger("stack")


@dataclass(frozen=True)
class ServiceSpec:
    """A service process: its make name, Python package and default port."""

    name: str
    package: str
    port: int
    upstream: str | None = None  # nginx upstream it serves, if public
    #: Started, and healthy, before the others: it owns a compacted topic others read
    #: into views (and republishes it at start when the broker lost it), or it reads none.
    first: bool = False

    def exists(self) -> bool:
        return (ROOT / "services" / self.package / "__main__.py").exists()


SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec("profile", "profile", 8101, "profile"),
    ServiceSpec("group", "group", 8102, "group", first=True),
    ServiceSpec("persistence", "persistence", 8103, "persistence"),
    ServiceSpec("session", "session", 8104, first=True),
    ServiceSpec("message-router", "message_router", 8105),
    ServiceSpec("group-router", "group_router", 8106),
    ServiceSpec("push-notification", "push_notification", 8107, first=True),
    ServiceSpec("gateway", "gateway", 8111, "gateway"),
)
GATEWAY_BASE_PORT = 8111


def spec(name: str) -> ServiceSpec:
    for s in SERVICES:
        if s.name == name or s.package == name:
            return s
    raise KeyError(name)


def load_dotenv(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (comments and blanks ignored); the process env wins."""
    values: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#") or "=" not in line:
                continue
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip().strip('"').strip("'")
    values.update({k: v for k, v in os.environ.items()})
    return values


def var_dir(value: str) -> Path:
    """``VAR_DIR`` as an absolute path: relative values are taken from the project root.

    Every path handed to a child (nginx resolves ``-c``/``-e`` against its ``-p``
    prefix, services run with ``cwd=ROOT``) must not depend on the caller's cwd.
    """
    path = Path(value.strip() or "var").expanduser()
    return (path if path.is_absolute() else ROOT / path).resolve()


class StartInterrupted(Exception):
    """A stop was requested (Ctrl-C, SIGTERM) while the stack was starting."""


@dataclass
class Stack:
    """Every process of the system, started in order and stopped in reverse."""

    var: Path
    env: dict[str, str] = field(default_factory=dict)
    public_port: int = 8080
    kafka_port: int = 19092
    mongo_port: int = 27117
    gateways: int = 2
    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, Proc] = field(default_factory=dict)
    embedded_kafka: bool = True
    embedded_mongo: bool = True
    auth_rate: str = "20r/s"
    auth_burst: int = 40
    #: Set from a signal handler (a plain assignment: nothing that takes a lock runs
    #: inside a handler); starting stops at the next spawn or readiness check.
    stop_requested: bool = False
    #: Set by :meth:`stop`: nothing is started again from then on.
    stopping: bool = False
    #: The background supervision of :meth:`supervise`, if any.
    supervision: SupervisorThread | None = None

    @classmethod
    def for_tests(cls, var: Path, gateways: int = 2) -> Stack:
        """A stack on free loopback ports, data under ``var``."""
        stack = cls(var=var, public_port=free_port(), kafka_port=free_port(), mongo_port=free_port(), gateways=gateways)
        # Tests and benchmarks sign up many users from one address.
        stack.auth_rate, stack.auth_burst = "200r/s", 400
        stack.env = {
            "LOG_LEVEL": "INFO",
            "PROFILE_JWT_SECRET": "test-signing-key-" + os.urandom(8).hex(),
            "ADMIN_USERNAME": "admin",
            "ADMIN_PASSWORD": "admin-password-for-tests",
            # Tests and benchmarks sign up thousands of users: OWASP's minimum Argon2id
            # cost (19 MiB, 2 passes, 1 lane) instead of the default RFC 9106 profile.
            "PROFILE_ARGON2_TIME_COST": "2",
            "PROFILE_ARGON2_MEMORY_KIB": "19456",
            "PROFILE_ARGON2_PARALLELISM": "1",
            # Every test client is 127.0.0.1, and some tests fail logins on purpose: that address
            # is not locked out per address (tests of the limit come from other loopback addresses).
            "PROFILE_LOGIN_EXEMPT_ADDRESSES": "127.0.0.1",
            "PROFILE_LOGIN_FAILURES_PER_ADDRESS": "20",
        }
        for s in SERVICES:
            stack.ports[s.name] = free_port()
        stack.ports.update({f"gateway-{i}": free_port() for i in range(1, gateways + 1)})
        return stack

    @classmethod
    def from_env(cls, values: dict[str, str]) -> Stack:
        """The development stack from .env (ports and production endpoints)."""
        stack = cls(
            var=var_dir(values.get("VAR_DIR", "")),
            public_port=int(values.get("PUBLIC_PORT", "8080")),
            kafka_port=int(values.get("EMBEDDED_KAFKA_PORT", "19092")),
            mongo_port=int(values.get("EMBEDDED_MONGO_PORT", "27117")),
            gateways=int(values.get("GATEWAY_INSTANCES", "2")),
            auth_rate=values.get("NGINX_AUTH_RATE", "20r/s"),
            auth_burst=int(values.get("NGINX_AUTH_BURST", "40")),
        )
        stack.env = dict(values)
        if not values.get("PROFILE_JWT_SECRET") and not values.get("PROFILE_JWT_SECRET_FILE"):
            # Development only: a signing key made once and kept under var/ (never in git).
            key = stack.var / "jwt.key"
            if not key.exists():
                stack.var.mkdir(parents=True, exist_ok=True)
                key.write_text(os.urandom(32).hex())
                key.chmod(0o600)
            stack.env["PROFILE_JWT_SECRET_FILE"] = str(key.resolve())
        stack.embedded_kafka = not values.get("KAFKA_BOOTSTRAP_SERVERS")
        stack.embedded_mongo = not values.get("MONGO_URL")
        for s in SERVICES:
            stack.ports[s.name] = int(values.get(f"{s.package.upper()}_PORT", s.port))
        base = int(values.get("GATEWAY_PORT", GATEWAY_BASE_PORT))
        stack.ports.update({f"gateway-{i}": base + i - 1 for i in range(1, stack.gateways + 1)})
        return stack

    # -- addresses --------------------------------------------------------

    @property
    def kafka(self) -> str:
        return self.env.get("KAFKA_BOOTSTRAP_SERVERS") or f"127.0.0.1:{self.kafka_port}"

    @property
    def mongo_url(self) -> str:
        return self.env.get("MONGO_URL") or f"mongodb://127.0.0.1:{self.mongo_port}/?retryWrites=false"

    @property
    def wakeup_dir(self) -> Path:
        return self.var / "kafka" / "wakeup"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.public_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.public_port}/v1/ws"

    def service_env(self, name: str, instance: int | None = None) -> dict[str, str]:
        """The environment one service process runs with."""
        env = dict(os.environ)
        env.update(self.env)
        env["KAFKA_BOOTSTRAP_SERVERS"] = self.kafka
        env["MONGO_URL"] = self.mongo_url
        if env.get("KAFKA_WAKEUP_DIR") == "off":
            # Consumers fetch in a loop of KAFKA_FETCH_MAX_WAIT_MS (how the fetch-wait curve
            # of docs/benchmarks.md is measured).
            env["KAFKA_WAKEUP_DIR"] = ""
        elif self.embedded_kafka and not env.get("KAFKA_WAKEUP_DIR"):
            # The embedded broker holds every fetch its full wait: producers ring consumers
            # instead (chatlib.wakeup). Apache Kafka needs none of it.
            env["KAFKA_WAKEUP_DIR"] = str(self.wakeup_dir)
        if self.embedded_kafka:
            # Each start of the embedded broker is a new cluster; a consumer group of the old one
            # that re-joined the new one can wedge it there (chatlib.kafka.group_name).
            env.setdefault("KAFKA_GROUP_PER_CLUSTER", "true")
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "libs"), str(ROOT)])
        env["PYTHONUNBUFFERED"] = "1"
        s = spec(name)
        prefix = s.package.upper()
        if name == "gateway":
            idx = instance or 1
            env["GATEWAY_PORT"] = str(self.ports[f"gateway-{idx}"])
            env["GATEWAY_INSTANCE_ID"] = f"gw{idx}"
        else:
            env[f"{prefix}_PORT"] = str(self.ports[name])
        if not env.get("PUSH_NOTIFICATION_PERSISTENCE_URL"):
            # push-notification reads mute lists from persistence's internal HTTP port.
            env["PUSH_NOTIFICATION_PERSISTENCE_URL"] = f"http://127.0.0.1:{self.ports['persistence']}"
        return env

    # -- lifecycle --------------------------------------------------------

    def start_infra(self, nginx: bool = True) -> None:
        """Kafka, MongoDB and topics (and Nginx unless told not to)."""
        raise_child_file_limit()
        self.var.mkdir(parents=True, exist_ok=True)
        if self.embedded_kafka:
            if port_open(self.kafka_port):
                raise RuntimeError(f"port {self.kafka_port} (Kafka) is already in use")
            shutil.rmtree(self.wakeup_dir, ignore_errors=True)  # doorbells of a previous run
            self._start(kafka_proc(self.kafka_port, self.var), lambda: port_open(self.kafka_port), 20)
        if self.embedded_mongo:
            if port_open(self.mongo_port):
                raise RuntimeError(f"port {self.mongo_port} (MongoDB) is already in use")
            self._start(mongo_proc(self.mongo_port, self.var), lambda: port_open(self.mongo_port), 60)
        self.create_topics()
        if nginx:
            self.start_nginx()

    def create_topics(self, wait_s: float = 30) -> None:
        sys.path.insert(0, str(ROOT / "libs"))
        from chatlib.kafka import ensure_topics, wait_for_broker
        from chatlib.topics import ALL_TOPICS, gateway_topic

        wait_for_broker(self.kafka, wait_s)
        topics = list(ALL_TOPICS) + [gateway_topic(f"gw{i}") for i in range(1, self.gateways + 1)]
        ensure_topics(self.kafka, topics)

    def nginx_settings(self) -> NginxSettings:
        upstreams: dict[str, list[int]] = {}
        for s in SERVICES:
            if s.upstream is None:
                continue
            if s.name == "gateway":
                upstreams[s.upstream] = [self.ports[f"gateway-{i}"] for i in range(1, self.gateways + 1)]
            else:
                upstreams[s.upstream] = [self.ports[s.name]]
        return NginxSettings(
            public_port=self.public_port,
            upstreams=upstreams,
            var=self.var,
            auth_rate=self.auth_rate,
            auth_burst=self.auth_burst,
        )

    def start_nginx(self) -> None:
        if port_open(self.public_port):
            raise RuntimeError(f"port {self.public_port} (public HTTP) is already in use")
        self._start(nginx_proc(self.nginx_settings()), lambda: port_open(self.public_port), 15)

    def service_names(self) -> list[str]:
        # STACK_ONLY=profile,session limits the stack to those services (while others are being built).
        only = {n.strip() for n in os.environ.get("STACK_ONLY", "").split(",") if n.strip()}
        return [s.name for s in SERVICES if s.exists() and (not only or s.name in only or s.package in only)]

    def service_proc(self, name: str, instance: int | None = None) -> Proc:
        """The process of one service (one gateway instance), not started."""
        s = spec(name)
        key = f"gateway-{instance or 1}" if name == "gateway" else name
        return Proc(
            key,
            [sys.executable, "-m", f"services.{s.package}"],
            self.var / "log" / f"{key}.log",
            env=self.service_env(name, instance),
            cwd=ROOT,
        )

    def start_service(self, name: str, instance: int | None = None, wait: bool = True) -> Proc:
        proc = self.service_proc(name, instance)
        port = self.ports[proc.name]
        if wait:
            self._start(proc, lambda: self.healthy(port, name), 60)
        else:
            self._spawn(proc)
        return proc

    def start_services(self) -> None:
        """Every service that exists, gateways ``self.gateways`` times, in two parallel waves.

        The owners of compacted topics (group, session) come first: before they
        answer /healthz they have put back on the broker what it lost (the
        embedded broker starts empty, MongoDB does not). Only then do the
        services that build views from those topics start, and each of them
        answers /healthz once its views have read the topics to the end, so
        the stack is "up" only when a message to an old group is routed.
        """
        names = self.service_names()
        first = [n for n in names if spec(n).first]
        for wave in (first, [n for n in names if n not in first]):
            pending: list[tuple[Proc, int]] = []
            for name in wave:
                instances = range(1, self.gateways + 1) if name == "gateway" else [None]
                for inst in instances:
                    proc = self.start_service(name, inst, wait=False)
                    key = f"gateway-{inst}" if name == "gateway" else name
                    pending.append((proc, self.ports[key], name))
            for proc, port, service in pending:
                wait_until(self._ready(partial(self.healthy, port, service)), 90, proc.name, proc.proc)  # type: ignore[arg-type]

    def start_all(self) -> None:
        self.start_infra(nginx=False)
        self.start_services()
        self.start_nginx()

    def healthy(self, port: int, service: str | None = None) -> bool:
        """``/healthz`` on ``port`` answers 200 — from ``service``, when named: a process that
        could not bind its port must not pass for ready because another one answers there."""
        try:
            r = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
            return r.status_code == 200 and (service is None or r.json().get("service") == service)
        except (requests.RequestException, ValueError):
            return False

    def _spawn(self, proc: Proc) -> None:
        """Start and record a process, unless a stop was requested.

        A signal handler only sets ``stop_requested``; starting checks it here
        and while waiting for readiness, so a stop during start-up never lands
        between a spawn and its record (which left processes nobody stopped).
        """
        self._check_stop()
        proc.start()
        self.procs[proc.name] = proc

    def _check_stop(self) -> None:
        if self.stop_requested:
            raise StartInterrupted("stop requested while starting")

    def _ready(self, check: Callable[[], bool]) -> Callable[[], bool]:
        def ready() -> bool:
            self._check_stop()
            return check()

        return ready

    def _start(self, proc: Proc, ready: Callable[[], bool], timeout: float) -> None:
        self._spawn(proc)
        try:
            wait_until(self._ready(ready), timeout, proc.name, proc.proc)  # type: ignore[arg-type]
        except RuntimeError:
            tail = proc.log.read_text(errors="replace")[-2000:] if proc.log.exists() else ""
            raise RuntimeError(f"{proc.name} failed to start; log tail:\n{tail}") from None

    def restart(self, key: str, kill: bool = False) -> None:
        """Stop (or kill -9) one process and start it again with the same settings (unsupervised stacks)."""
        if self.supervision is not None:
            raise RuntimeError("a supervised stack restarts its processes itself")
        proc = self.procs[key]
        if kill:
            proc.kill()
        else:
            proc.stop()
        if key.startswith("gateway-"):
            self.start_service("gateway", int(key.split("-")[1]))
        elif key in {s.name for s in SERVICES}:
            self.start_service(key)
        else:
            raise KeyError(f"restart of {key} is not supported")

    def restart_mongo(self, kill: bool = True) -> None:
        """Kill (or stop) the embedded MongoDB and start it again on the same port and data (unsupervised)."""
        if self.supervision is not None:
            raise RuntimeError("a supervised stack restarts its processes itself")
        proc = self.procs["mongo"]
        proc.kill() if kill else proc.stop()
        self._start(mongo_proc(self.mongo_port, self.var), lambda: port_open(self.mongo_port), 60)

    # -- supervision --------------------------------------------------------

    def recipe(self, key: str) -> Recipe:
        """How the supervisor starts ``key`` again and tells that it serves."""
        if key == "kafka":
            return Recipe(lambda: kafka_proc(self.kafka_port, self.var), self._broker_ready)
        if key == "mongo":
            return Recipe(lambda: mongo_proc(self.mongo_port, self.var), lambda: port_open(self.mongo_port))
        if key == "nginx":
            return Recipe(lambda: nginx_proc(self.nginx_settings()), lambda: port_open(self.public_port))
        port = self.ports[key]
        if key.startswith("gateway-"):
            instance = int(key.split("-")[1])
            return Recipe(lambda: self.service_proc("gateway", instance), lambda: self.healthy(port, "gateway"))
        return Recipe(lambda: self.service_proc(key), lambda: self.healthy(port, key))

    def _broker_ready(self) -> bool:
        """A restarted embedded broker is empty: ready once every topic is there again.

        The services notice the new broker by themselves (its cluster id is new)
        and rebuild what they kept on it; creating the topics here first gives
        them their declared partition counts (the broker would create a topic a
        client names with its own default).
        """
        if not port_open(self.kafka_port):
            return False
        try:
            self.create_topics(wait_s=2)
        except Exception as exc:  # noqa: BLE001 - not answering yet: asked again at the next look
            logger.debug("topics not created yet: %s", exc)
            return False
        return True

    def supervisor(self, say: Callable[[str], None], policy: Policy | None = None) -> Supervisor:
        """A supervisor of every process started so far (call its ``tick`` from this thread)."""

        def started(key: str, proc: Process) -> None:
            assert isinstance(proc, Proc)
            self.procs[key] = proc

        sup = Supervisor(say, policy, on_start=started)
        for key, proc in self.procs.items():
            sup.watch(key, proc, self.recipe(key))
        return sup

    def supervise(self, say: Callable[[str], None] = print, policy: Policy | None = None) -> SupervisorThread:
        """Supervise every process from a background thread (tests and the fault campaign).

        ``make run`` supervises from its main thread instead (helper/run.py).
        """
        self.supervision = SupervisorThread(self, self.supervisor(say, policy))
        self.supervision.start()
        return self.supervision

    def stop(self) -> None:
        """Stop everything this stack started, services first, Kafka last."""
        self.stopping = True
        if self.supervision is not None:
            # Wait for a look in progress (it may be starting a process) before listing them.
            self.supervision.pause()
        try:
            self._stop_procs()
        finally:
            if self.supervision is not None:
                self.supervision.finish()
                self.supervision = None

    def _stop_procs(self) -> None:
        infra = ("nginx", "mongo", "kafka")
        services = [p for k, p in self.procs.items() if k not in infra]
        # Services stop in parallel (each finishes its batch and commits), then the infrastructure.
        for proc in services:
            proc.signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in services:
            proc.stop(timeout=max(0.1, deadline - time.monotonic()))
        for key in infra:
            proc = self.procs.get(key)
            if proc is not None:
                proc.stop(timeout=10)
        self.procs.clear()


class SupervisorThread(threading.Thread):
    """Runs a :class:`Supervisor` until the stack is stopped.

    It lives until every process is stopped: the children it starts get their
    parent-death signal from it (``owns_children``), so it must not end first.
    If the supervisor gives up, ``gave_up`` says why and nothing more is restarted.
    """

    owns_children = True

    def __init__(self, stack: Stack, supervisor: Supervisor, interval_s: float = 0.1):
        super().__init__(name="stack-supervisor", daemon=True)
        self.stack = stack
        self.supervisor = supervisor
        self.interval_s = interval_s
        self.gave_up: str | None = None
        self._lock = threading.Lock()
        self._paused = False
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval_s):
            with self._lock:
                if self._paused or self.gave_up is not None:
                    continue
                try:
                    self.gave_up = self.supervisor.tick()
                except Exception:
                    logger.exception("supervisor look failed")
                if self.gave_up is not None:
                    self.supervisor.say(f"giving up: {self.gave_up}")

    def pause(self) -> None:
        """No more restarts; returns once a look in progress is over."""
        with self._lock:
            self._paused = True

    def finish(self) -> None:
        self._done.set()
        if self is not threading.current_thread():
            self.join(10)


#: Open files every process this stack starts may have at least (its soft limit): 10,000
#: sockets are 20,000 descriptors in Nginx and 10,000 in a gateway.
CHILD_NOFILE = 65536


def raise_child_file_limit() -> int:
    """Raise this process's soft open-file limit (up to the hard limit) before children start.

    Children inherit it: the broker and the database hold a connection per
    client, and an Nginx not run as root cannot raise its own past the hard
    limit. Services raise theirs again as their settings need
    (``chatlib.runner``). Returns the soft limit now in force.
    """
    if str(ROOT / "libs") not in sys.path:
        sys.path.insert(0, str(ROOT / "libs"))
    from chatlib.oslimits import raise_open_file_limit

    return raise_open_file_limit(CHILD_NOFILE)


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            requests.get(url, timeout=1)
            return
        except requests.RequestException:
            time.sleep(0.2)
    raise RuntimeError(f"{url} not answering")
