"""`make bench`: load the whole system through Nginx and measure latency and CPU per process.

Starts its own system on free loopback ports (the same processes as
`make run`: Tansu, SecantusDB, Nginx, every service, two gateways; OWASP's
minimum Argon2 cost so that sign-ups are quick), signs up the accounts the
chosen phases need, and drives the system from several worker processes,
each an asyncio loop owning a share of the sockets, one socket per device:

- floor: ping -> pong through Nginx and a gateway (every latency is also
  given as a multiple of its p50);
- idle: the 1-to-1 sockets connected, no traffic: CPU of the stack;
- one: one message at a time (send, wait for the recipient's frame, next);
- ladder: open-loop rates, stopping after the first rate whose p99 passes
  the limit (but never before --ladder-min); the --profile-rate step is
  profiled with py-spy (busiest Python process, flame graph SVG);
- catchup: a device comes back to N pending messages in one conversation;
- group: one group, every member connected, latency to the first and last.

Latency counts from the *planned* send time (no coordinated omission);
messages that never arrive rank above every measured one. Every phase
reports the CPU seconds of every process tree of the stack over the phase.
Figures are printed as each phase ends; a full run writes docs/benchmarks.md's
generated section, plots and raw JSON under docs/bench/.

    python -m bench.run --phases idle,one,ladder --rates 100,200 --seconds 10
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [p for p in (str(ROOT / "libs"), str(ROOT)) if p not in sys.path]

from chatlib.oslimits import raise_open_file_limit  # noqa: E402

from helper.stack import Stack  # noqa: E402

from . import connections, report  # noqa: E402
from .phases import Bench, new_nonce  # noqa: E402
from .pool import Pool  # noqa: E402

#: In the order they run: the group fan-out, the heaviest (a thousand sockets, a thousand
#: receipts per message), goes last so that a backlog it leaves cannot spoil another phase.
PHASES = ("floor", "idle", "one", "ladder", "catchup", "group", "connections")


def csv(kind: type) -> Any:
    def parse(text: str) -> list[Any]:
        return [kind(x) for x in text.replace(" ", ",").split(",") if x]

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--phases", type=csv(str), default=list(PHASES), help=f"comma list of {','.join(PHASES)}")
    p.add_argument("--workers", type=int, default=4, help="load generator processes")
    p.add_argument("--users", type=int, default=100, help="1-to-1 users (in pairs, one socket each)")
    p.add_argument("--rates", type=csv(float), default=[100.0, 200.0, 500.0, 1000.0, 2000.0])
    p.add_argument("--seconds", type=float, default=15, help="length of each ladder step")
    p.add_argument("--p99-limit", type=float, default=100, help="ladder: stop after the first p99 above this (ms)")
    p.add_argument("--ladder-min", type=float, default=500, help="ladder: rates up to this always run")
    p.add_argument("--drain", type=float, default=30, help="seconds a phase waits for late messages after sending")
    p.add_argument("--pause", type=float, default=2, help="seconds between ladder steps")
    p.add_argument("--settle", type=float, default=3, help="seconds of quiet before idle and other phases")
    p.add_argument(
        "--quiet-budget", type=float, default=60, help="seconds a phase waits for earlier phases' late messages"
    )
    p.add_argument("--floor-count", type=int, default=300, help="ping round trips (40/s)")
    p.add_argument("--idle-seconds", type=float, default=20)
    p.add_argument("--one-count", type=int, default=200, help="messages sent one at a time")
    p.add_argument("--one-budget", type=float, default=180, help="seconds the one-at-a-time phase may take")
    p.add_argument("--group-members", type=int, default=1000)
    p.add_argument("--group-messages", type=int, default=50)
    p.add_argument("--group-rate", type=float, default=1.0, help="group messages per second (open loop)")
    p.add_argument("--group-receipts", choices=("each", "off"), default="each")
    p.add_argument("--catchup", type=int, default=10000, help="pending messages the device comes back to")
    p.add_argument("--catchup-senders", type=int, default=8, help="sockets of the sender's device that fill")
    p.add_argument("--catchup-budget", type=float, default=120, help="seconds the device may take to catch up")
    p.add_argument("--profile-rate", type=float, default=500, help="ladder step profiled with py-spy")
    p.add_argument("--profile-seconds", type=float, default=10)
    p.add_argument("--profile-sample", type=float, default=2, help="seconds over which the busiest is chosen")
    p.add_argument("--no-profile", dest="profile", action="store_false")
    p.add_argument("--gateways", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="environment of the stack")
    p.add_argument("--signup-parallel", type=int, default=16)
    p.add_argument("--no-docs", dest="docs", action="store_false", help="leave docs/ alone (figures to var/bench/)")
    p.add_argument("--keep-var", action="store_true", help="keep the stack's data and logs (kept anyway on errors)")
    p.add_argument(
        "--render", type=Path, metavar="RESULTS_JSON", help="only write the report and plots again from a results.json"
    )
    connections.add_arguments(p)
    args = p.parse_args(argv)
    unknown = set(args.phases) - set(PHASES)
    if unknown:
        p.error(f"unknown phases: {', '.join(sorted(unknown))} (choose from {', '.join(PHASES)})")
    if args.users < 2:
        p.error("--users must be at least 2 (one pair)")
    if "group" in args.phases and args.group_members < 2:
        p.error("--group-members must be at least 2")
    for kv in args.set:
        if "=" not in kv:
            p.error(f"--set {kv}: expected KEY=VALUE")
    return args


def describe(args: argparse.Namespace, stack: Stack) -> tuple[str, str]:
    overrides = [kv for kv in args.set]
    stack_text = (
        f"`make run`'s processes on free loopback ports ({args.gateways} gateways), Argon2id at OWASP's minimum "
        "(t=2, 19 MiB), LOG_LEVEL=WARNING" + (f", and {', '.join(f'`{kv}`' for kv in overrides)}" if overrides else "")
    )
    gen = (
        f"{args.workers} worker processes (asyncio, websockets), {args.users} users in pairs with one socket each, "
        "every recipient answering every message with a `delivered` receipt; latency from the planned send time"
    )
    return stack_text, gen


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        saved = json.loads(args.render.read_text())
        finish(saved, args, ROOT / "docs" / "bench" if args.docs else args.render.resolve().parent)
        return 0
    raise_open_file_limit(65536)  # the controller opens a few sockets; its workers raise their own
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = ROOT / "docs" / "bench" if args.docs else ROOT / "var" / "bench" / stamp
    out_dir.mkdir(parents=True, exist_ok=True)
    stack = Stack.for_tests(Path(tempfile.mkdtemp(prefix="chat-bench-")), gateways=args.gateways)
    stack.env["LOG_LEVEL"] = "WARNING"
    for kv in args.set:
        key, _, value = kv.partition("=")
        stack.env[key.strip()] = value.strip()

    def on_signal(signum: int, frame: Any) -> None:
        stack.stop_requested = True  # a flag only: start-up checks it between steps
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    command = "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:])
    run: dict[str, Any] = {
        "started": report.started_text(),
        "command": command.strip(),
        "code": report.git_describe(),
        "machine": report.machine(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "options": vars(args),
        "phases": [],
    }
    run["stack"], run["generator"] = describe(args, stack)
    pool = None
    print(f"starting the system (logs in {stack.var / 'log'})...", flush=True)
    t = time.monotonic()
    try:
        stack.start_all()
        run["start_s"] = round(time.monotonic() - t, 1)
        print(f"  started in {run['start_s']} s", flush=True)
        nonce = new_nonce()
        pool = Pool(args.workers, stack.ws_url, nonce)
        bench = Bench(stack, args, pool, nonce, out_dir)
        run_phases(bench, args, run)
        bench.late_arrivals(run["phases"])
        run["setup"] = bench.setup
    except KeyboardInterrupt:
        print("interrupted: stopping, figures so far follow", flush=True)
        run["interrupted"] = True
    finally:
        if pool is not None:
            pool.stop()
        stack.stop()
    if args.keep_var or any("error" in p for p in run["phases"]) or run.get("interrupted"):
        print(f"the stack's data and logs are kept in {stack.var}", flush=True)
    else:
        shutil.rmtree(stack.var, ignore_errors=True)
    finish(run, args, out_dir)
    return 0


def run_phases(bench: Bench, args: argparse.Namespace, run: dict[str, Any]) -> None:
    """Accounts and the 1-to-1 sockets first, then each chosen phase in the order of PHASES.

    A phase that raises is recorded with its traceback and the run goes on:
    one broken phase must not lose the figures of the others.
    """
    chosen = set(args.phases)
    pairs = args.users - args.users % 2
    needed = max(pairs, args.group_members) if "group" in chosen else pairs
    bench.sign_up(needed, 2 if "catchup" in chosen else 0)
    print(f"connecting {pairs} 1-to-1 sockets over {args.workers} workers...", flush=True)
    bench.setup["connect"] = bench.connect(bench.pair_sids(), "pairs")
    bench.setup["warm_up"] = bench.warm_up()
    steps: dict[str, Callable[[], Any]] = {
        "floor": bench.floor,
        "idle": bench.idle,
        "one": bench.one_at_a_time,
        "ladder": bench.ladder,
        "group": bench.group,
        "catchup": bench.catch_up,
        "connections": lambda: connections.run(bench),
    }
    for name in PHASES:
        if name not in chosen:
            continue
        print(f"== {name}", flush=True)
        quiet = bench.quiesce() if name != "ladder" else {}  # the ladder waits before each step
        result: Any
        try:
            result = steps[name]()
        except KeyboardInterrupt:
            raise
        except Exception:
            result = {"phase": name, "name": name, "error": traceback.format_exc()}
        if name == "ladder" and isinstance(result, tuple):
            run["phases"] += result[0]
            run["ladder"] = result[1]
        elif name == "connections":
            run["connections"] = result  # its own section of docs/benchmarks.md (bench.connections)
        else:
            result.update(quiet)
            run["phases"].append(result)
            bench.print_result(result)
        time.sleep(args.pause)


def finish(run: dict[str, Any], args: argparse.Namespace, out_dir: Path) -> None:
    if "connections" in run:
        connections.finish(run, args.docs, out_dir, ROOT)
        if not run["phases"]:
            return  # a run of the connection phase alone leaves the other section and results.json alone
    report.write_json(out_dir / "results.json", run)
    try:
        images = report.plots(run, out_dir)
    except Exception:
        print("plots failed:\n" + traceback.format_exc(), flush=True)
        images = {}
    section = report.markdown(run, images)
    print("\n" + section, flush=True)
    if args.docs:
        report.write_markdown(ROOT / "docs" / "benchmarks.md", section)
        print(f"\nwritten: docs/benchmarks.md, {_shown(out_dir)}/", flush=True)
    else:
        (out_dir / "benchmarks.md").write_text(section + "\n")
        print(f"\nwritten: {_shown(out_dir)}/ (docs/ left alone)", flush=True)


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


if __name__ == "__main__":
    sys.exit(main())
