"""Command line behind ``make run``, ``make infra`` and ``make run-<service>``.

    python -m helper.run all            # everything, in the foreground
    python -m helper.run infra          # Kafka, MongoDB, topics, Nginx only
    python -m helper.run service NAME   # one service in the foreground

Reads .env (created from .env.tmpl by make). Ctrl-C or SIGTERM stops every
process it started.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from .infra import ROOT
from .stack import SERVICES, Stack, StartInterrupted, load_dotenv, spec


def _wait_for_signal(stack: Stack, watch: bool) -> int:
    code = 0
    while not stack.stop_requested.wait(1.0):
        if watch:
            dead = [p.name for p in stack.procs.values() if not p.alive()]
            if dead:
                print(f"stopping: process(es) exited unexpectedly: {', '.join(dead)} (see {stack.var}/log)", flush=True)
                code = 1
                break
    print("stopping every process...", flush=True)
    stack.stop()
    print("stopped.", flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="helper.run")
    parser.add_argument("what", choices=["all", "infra", "service", "topics"])
    parser.add_argument("name", nargs="?")
    args = parser.parse_args(argv)
    values = load_dotenv(ROOT / ".env")
    stack = Stack.from_env(values)
    # From here on a signal, even one during start-up, stops whatever was started:
    # the handler only asks; starting checks between steps (see Stack._spawn).
    signal.signal(signal.SIGINT, lambda *_: stack.stop_requested.set())
    signal.signal(signal.SIGTERM, lambda *_: stack.stop_requested.set())
    try:
        if args.what == "topics":
            stack.create_topics()
            print("topics ready")
            return 0
        if args.what == "service":
            if not args.name:
                parser.error("service needs a NAME: " + ", ".join(s.name for s in SERVICES))
            s = spec(args.name)
            env = stack.service_env(s.name, 1 if s.name == "gateway" else None)
            if s.name == "gateway" and values.get("GATEWAY_INSTANCE_ID"):
                env["GATEWAY_INSTANCE_ID"] = values["GATEWAY_INSTANCE_ID"]
            os.chdir(ROOT)
            os.execve(sys.executable, [sys.executable, "-m", f"services.{s.package}"], env)  # noqa: S606
        if args.what == "infra":
            stack.start_infra(nginx=True)
            print(
                f"infrastructure up: Kafka {stack.kafka}, MongoDB {stack.mongo_url}, Nginx {stack.base_url}", flush=True
            )
            print("start services with make run-<service>; Ctrl-C stops.", flush=True)
            return _wait_for_signal(stack, watch=True)
        print("starting Kafka, MongoDB, services and Nginx...", flush=True)
        stack.start_all()
        names = ", ".join(stack.service_names())
        print(f"chat backend up: {stack.base_url}  (API under /v1, WebSocket {stack.ws_url}, test page /)", flush=True)
        print(f"services: {names}; gateways: {stack.gateways}; logs in {stack.var / 'log'}", flush=True)
        print("Ctrl-C stops everything.", flush=True)
        return _wait_for_signal(stack, watch=True)
    except StartInterrupted:
        print("signal during start-up: stopping what was started...", flush=True)
        stack.stop()
        return 130
    except Exception as exc:  # noqa: BLE001 - report plainly, stop what was started
        print(f"error: {exc}", file=sys.stderr, flush=True)
        stack.stop()
        return 1


if __name__ == "__main__":
    sys.exit(main())
