"""`make bench`: load the whole system through Nginx and report latency and throughput.

Starts its own system on free loopback ports (the same code path as `make run`),
then runs, in one go:

1. floor: WebSocket ping/pong round trips through the same Nginx and gateway;
2. 1-to-1: N users in pairs, one socket each, messages sent open-loop at a
   fixed rate; latency from send to receipt at the recipient, ack latency,
   delivered msgs/s;
3. group fan-out: one group with M members, M connected devices; latency from
   send to the last member's delivery.

Figures are printed and written between markers in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from websockets.asyncio.client import ClientConnection, connect

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "libs"), str(ROOT)]

from chatlib.oslimits import raise_open_file_limit  # noqa: E402

from helper.stack import Stack  # noqa: E402

PASSWORD = "bench-password-1"


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


def summary(values_ms: list[float]) -> dict[str, float]:
    return {
        "n": len(values_ms),
        "p50": round(pct(values_ms, 50), 2),
        "p99": round(pct(values_ms, 99), 2),
        "p99.9": round(pct(values_ms, 99.9), 2),
        "max": round(max(values_ms), 2) if values_ms else float("nan"),
        "mean": round(statistics.fmean(values_ms), 2) if values_ms else float("nan"),
    }


@dataclass
class Account:
    user_id: str
    token: str
    username: str


def make_accounts(base: str, n: int, workers: int = 8) -> list[Account]:
    """Sign up and log in ``n`` users through Nginx (Argon2 makes this the slow part)."""
    tag = uuid.uuid4().hex[:6]

    def one(i: int) -> Account:
        s = requests.Session()
        name = f"b{tag}{i}"
        r = s.post(f"{base}/v1/auth/signup", json={"username": name, "password": PASSWORD}, timeout=30)
        r.raise_for_status()
        r = s.post(
            f"{base}/v1/auth/login", json={"username": name, "password": PASSWORD, "device_type": "mobile"}, timeout=30
        )
        r.raise_for_status()
        b = r.json()
        return Account(b["user_id"], b["access_token"], name)

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, range(n)))


async def open_socket(ws_url: str, token: str) -> ClientConnection:
    return await connect(ws_url, additional_headers={"Authorization": f"Bearer {token}"}, max_size=2**20)


@dataclass
class Stats:
    latencies: list[float] = field(default_factory=list)
    acks: list[float] = field(default_factory=list)
    received: int = 0
    duplicates: int = 0
    #: messages of an earlier phase seen in this one (not counted as received)
    earlier: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)


async def reader(ws: ClientConnection, stats: Stats, sent_at: dict[str, int], receipts: bool, seen: set[Any]) -> None:
    async for raw in ws:
        now = time.monotonic_ns()
        f = json.loads(raw)
        t = f.get("type")
        if t == "message":
            key = (f["conversation"], f["seq"])
            if key in seen:
                stats.duplicates += 1
                continue
            seen.add(key)
            started = sent_at.get(f["id"])
            if started is not None:
                stats.received += 1
                stats.latencies.append((now - started) / 1e6)
            else:
                stats.earlier += 1  # an earlier phase's message, re-sent by a gap replay
            if receipts:
                await ws.send(
                    json.dumps(
                        {
                            "type": "receipt",
                            "conversation": f["conversation"],
                            "status": "delivered",
                            "up_to_seq": f["seq"],
                        }
                    )
                )
        elif t == "ack":
            started = sent_at.get(f["id"])
            if started is not None:
                stats.acks.append((now - started) / 1e6)
        elif t == "error":
            stats.errors.append(f)


async def floor(ws_url: str, acc: Account, count: int, per_s: float = 40) -> dict[str, float]:
    """Ping/pong round trips through Nginx and a gateway: the floor of any frame.

    Paced below the gateway's per-socket rate limit (GATEWAY_RATE_PER_SOCKET,
    50 frames/s by default): a faster client gets ``rate_limited`` errors instead.
    """
    ws = await open_socket(ws_url, acc.token)
    rtts = []
    for _ in range(count):
        t0 = time.monotonic_ns()
        await ws.send('{"type":"ping"}')
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if frame.get("type") == "pong":
                break
            if frame.get("type") == "error":
                raise RuntimeError(f"floor ping refused: {frame}")
        rtts.append((time.monotonic_ns() - t0) / 1e6)
        await asyncio.sleep(max(0.0, 1 / per_s - (time.monotonic_ns() - t0) / 1e9))
    await ws.close()
    return summary(rtts[10:])


async def one_to_one(
    ws_url: str, accounts: list[Account], rate: float, seconds: float, receipts: bool
) -> dict[str, Any]:
    """Open-loop 1-to-1 traffic between fixed pairs at ``rate`` msgs/s."""
    sockets = [await open_socket(ws_url, a.token) for a in accounts]
    await asyncio.sleep(3)  # let sessions and replay settle
    stats = Stats()
    sent_at: dict[str, int] = {}
    seen: set[Any] = set()
    readers = [asyncio.create_task(reader(ws, stats, sent_at, receipts, seen)) for ws in sockets]
    total = int(rate * seconds)
    t0 = time.monotonic()
    rng = random.Random(1)
    for i in range(total):
        target = t0 + i / rate
        delay = target - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        a = rng.randrange(len(accounts))
        peer = a ^ 1 if (a ^ 1) < len(accounts) else a - 1
        cid = uuid.uuid4().hex
        sent_at[cid] = time.monotonic_ns()
        await sockets[a].send(
            json.dumps({"type": "message", "id": cid, "to": accounts[peer].user_id, "body": "x" * 100})
        )
    send_elapsed = time.monotonic() - t0
    deadline = time.monotonic() + 15
    while stats.received < total and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    elapsed = time.monotonic() - t0
    for task in readers:
        task.cancel()
    for ws in sockets:
        await ws.close()
    return {
        "rate_target": rate,
        "sent": total,
        "received": stats.received,
        "acked": len(stats.acks),
        "duplicates_dropped": stats.duplicates,
        "earlier_phase_messages": stats.earlier,
        "errors": len(stats.errors),
        "send_seconds": round(send_elapsed, 2),
        "delivered_per_s": round(stats.received / elapsed, 1),
        "latency_ms": summary(stats.latencies),
        "ack_ms": summary(stats.acks),
    }


async def group_fanout(base: str, ws_url: str, accounts: list[Account], messages: int) -> dict[str, Any]:
    """One group of len(accounts) members, all connected; latency to the last delivery."""
    owner = accounts[0]
    members = [a.user_id for a in accounts[1:]]
    r = requests.post(
        f"{base}/v1/groups",
        json={"name": "bench", "members": members},
        headers={"Authorization": f"Bearer {owner.token}"},
        timeout=60,
    )
    r.raise_for_status()
    gid = r.json()["group_id"]
    sockets = []
    for i in range(0, len(accounts), 50):
        sockets += await asyncio.gather(*(open_socket(ws_url, a.token) for a in accounts[i : i + 50]))
    print(f"{len(sockets)} sockets open", flush=True)
    await asyncio.sleep(5)  # sessions reach the routers' live views
    arrivals: dict[str, list[int]] = {}

    async def read(ws: ClientConnection) -> None:
        # Stamp first, parse cheaply: one client process reads every member's socket,
        # so its own per-frame work adds to the last member's figure.
        async for raw in ws:
            now = time.monotonic_ns()
            if '"type":"message"' in raw or '"type": "message"' in raw:
                arrivals.setdefault(json.loads(raw)["id"], []).append(now)

    tasks = [asyncio.create_task(read(ws)) for ws in sockets[1:]]
    lasts, firsts = [], []
    expected = len(accounts) - 1
    for _ in range(messages):
        cid = uuid.uuid4().hex
        t0 = time.monotonic_ns()
        await sockets[0].send(json.dumps({"type": "message", "id": cid, "group": gid, "body": "fan-out"}))
        deadline = time.monotonic() + 30
        while len(arrivals.get(cid, [])) < expected and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        got = arrivals.get(cid, [])
        if got:
            firsts.append((min(got) - t0) / 1e6)
            lasts.append((max(got) - t0) / 1e6)
        await asyncio.sleep(0.5)
    for t in tasks:
        t.cancel()
    for ws in sockets:
        await ws.close()
    complete = sum(1 for cid, got in arrivals.items() if len(got) >= expected)
    return {
        "members": len(accounts),
        "messages": messages,
        "complete_deliveries": complete,
        "first_delivery_ms": summary(firsts),
        "last_delivery_ms": summary(lasts),
    }


def machine() -> str:
    cpu = "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    system = f"{platform.system()} {platform.release()}"
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, {system}, Python {platform.python_version()}"


def write_report(results: dict[str, Any], command: str) -> str:
    lines = [
        "<!-- bench:start (generated by `make bench`; edit outside the markers) -->",
        f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} — `{command}`",
        "",
        f"Machine: {machine()}",
        "",
        "```json",
        json.dumps(results, indent=2),
        "```",
        "<!-- bench:end -->",
    ]
    block = "\n".join(lines)
    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if "<!-- bench:start" in text:
        head = text.split("<!-- bench:start")[0]
        tail = text.split("<!-- bench:end -->", 1)[1] if "<!-- bench:end -->" in text else ""
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n## Latest run\n\n" + block + "\n"
    path.write_text(text)
    return block


async def main_async(args: argparse.Namespace, stack: Stack) -> dict[str, Any]:
    base, ws_url = stack.base_url, stack.ws_url
    results: dict[str, Any] = {}
    print(f"signing up {args.users} users...", flush=True)
    accounts = make_accounts(base, args.users)
    results["floor_ping_pong_ms"] = await floor(ws_url, accounts[0], 400)
    print("floor:", results["floor_ping_pong_ms"], flush=True)
    for rate in args.rates:
        res = await one_to_one(ws_url, accounts, rate, args.seconds, receipts=not args.no_receipts)
        results[f"one_to_one_{int(rate)}_per_s"] = res
        print(f"1-to-1 at {rate}/s:", json.dumps(res), flush=True)
    if args.group_members > 0:
        print(f"signing up {args.group_members} group members...", flush=True)
        members = accounts[: min(len(accounts), args.group_members)]
        if len(members) < args.group_members:
            members += make_accounts(base, args.group_members - len(members))
        res = await group_fanout(base, ws_url, members, args.group_messages)
        results[f"group_fanout_{args.group_members}"] = res
        print("group fan-out:", json.dumps(res), flush=True)
    return results


def main() -> int:
    raise_open_file_limit(65536)  # a thousand sockets and more, beyond a shell's 1024
    parser = argparse.ArgumentParser(prog="bench.run")
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--rates", type=float, nargs="+", default=[50.0, 200.0, 500.0])
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--group-members", type=int, default=1000)
    parser.add_argument("--group-messages", type=int, default=20)
    parser.add_argument("--no-receipts", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    stack = Stack.for_tests(Path(tempfile.mkdtemp(prefix="chat-bench-")), gateways=2)
    stack.env["LOG_LEVEL"] = "WARNING"
    print("starting the system...", flush=True)
    stack.start_all()
    try:
        results = asyncio.run(main_async(args, stack))
    finally:
        stack.stop()
    if not args.no_write:
        print(write_report(results, "make bench " + " ".join(sys.argv[1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
