"""The benchmark's phases, run by the controller against one started stack.

Each phase returns a plain dict (it goes to JSON and the report) with the
same core: counts (planned, sent, acked, delivered, duplicates, errors by
code), latency and ack summaries from the planned send time (missing
messages ranked as infinitely late), how far the generator itself fell
behind its plan, whether the phase finished within its budget, and the CPU
seconds of every process of the stack over the phase (see :mod:`bench.cpu`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from helper.stack import Stack

from . import cpu, schedule
from .accounts import Account, make_accounts, refresh_stale
from .pool import Pool
from .stats import summary, times_floor

#: Display names of the stack's processes (Stack.procs keys otherwise).
DISPLAY = {"kafka": "tansu", "mongo": "secantusd"}
GENERATOR = "load generator"
PY_SPY = "py-spy"
OTHERS = "other processes"
#: Socket ids of the catch-up sender's sockets and of its recipient (apart from account indexes).
CATCHUP_SID = 1_000_000


def dm_id(a: str, b: str) -> str:
    x, y = sorted((a, b))
    return f"dm:{x}:{y}"


class Bench:
    """One run: the stack, the worker pool, the accounts, and the results so far."""

    def __init__(self, stack: Stack, args: argparse.Namespace, pool: Pool, nonce: str, out_dir: Path):
        self.stack = stack
        self.args = args
        self.pool = pool
        self.nonce = nonce
        self.out_dir = out_dir
        self.roots = {DISPLAY.get(k, k): p.pid for k, p in stack.procs.items() if p.pid is not None}
        self.accounts: list[Account] = []
        self.extra: list[Account] = []  # catch-up sender and recipient
        self.connected: set[int] = set()
        self.floor_p50: float | None = None
        self.setup: dict[str, Any] = {}
        #: tag -> (messages, arrivals) still expected: a later phase waits for them first
        self.outstanding: dict[str, tuple[int, int | None]] = {}

    # -- helpers ------------------------------------------------------------

    def say(self, text: str) -> None:
        print(text, flush=True)

    def tag(self, name: str) -> str:
        return f"{self.nonce}{name}"

    def account_of(self, sid: int) -> Account:
        return self.accounts[sid]

    def partner(self, sid: int) -> int:
        return sid ^ 1

    def cpu_window(self) -> Callable[[int], dict[str, Any]]:
        """Snapshot now; the returned function snapshots again and gives the phase's CPU figures."""
        before = cpu.snapshot()
        busy0 = cpu.machine_busy()
        t0 = time.monotonic()
        me = _self_pid()

        def end(messages: int) -> dict[str, Any]:
            after = cpu.snapshot()
            busy1 = cpu.machine_busy()
            wall = time.monotonic() - t0
            seconds = cpu.tree_seconds(before, after, self.roots)
            gen = sum(cpu.tree_seconds(before, after, {str(p): p for p in self.pool.pids}).values())
            mine_before, mine_after = before.get(me), after.get(me)
            own = reaped = 0.0
            if mine_before and mine_after:
                own = (mine_after.ticks - mine_before.ticks) / cpu.CLK_TCK
                # py-spy is the only child the controller starts and reaps during a phase.
                reaped = (mine_after.child_ticks - mine_before.child_ticks) / cpu.CLK_TCK
            machine = (busy1 - busy0) / cpu.CLK_TCK
            stack = sum(seconds.values())
            out: dict[str, Any] = {
                "wall_s": round(wall, 2),
                # Whatever else ran on the machine meanwhile (other people's tests): the
                # figures are only as clean as this is small.
                OTHERS: round(max(0.0, machine - stack - gen - own - reaped), 2),
                "seconds": {k: round(v, 2) for k, v in seconds.items()},
                "stack_s": round(sum(seconds.values()), 2),
                "cores": {k: round(v / wall, 3) for k, v in seconds.items()} if wall > 0 else {},
                "stack_cores": round(sum(seconds.values()) / wall, 3) if wall > 0 else None,
                GENERATOR: round(gen + own, 2),
                PY_SPY: round(reaped, 2),
                "split": {
                    k: {n: round(v, 2) for n, v in cpu.split_seconds(before, after, pid).items()}
                    for k, pid in self.roots.items()
                },
                "messages": messages,
            }
            if messages:
                out["ms_per_msg"] = {k: round(v * 1000 / messages, 3) for k, v in seconds.items()}
                out["stack_ms_per_msg"] = round(sum(seconds.values()) * 1000 / messages, 3)
            return out

        return end

    # -- accounts and sockets -------------------------------------------------

    def sign_up(self, count: int, extra: int) -> None:
        """Every account the chosen phases need, made once, in parallel, through Nginx."""
        t = time.monotonic()
        self.say(f"signing up {count + extra} accounts ({self.args.signup_parallel} in parallel)...")
        started = time.monotonic()

        def progress(done: int) -> None:
            self.say(f"  {done} of {count} after {time.monotonic() - started:.0f} s")

        self.accounts = make_accounts(self.stack.base_url, count, self.args.signup_parallel, progress=progress)
        self.extra = make_accounts(self.stack.base_url, extra, self.args.signup_parallel, prefix="c")
        took = time.monotonic() - t
        self.setup["signups"] = {
            "accounts": count + extra,
            "seconds": round(took, 1),
            "per_s": round((count + extra) / took, 1) if took > 0 else None,
        }
        self.say(f"  {count + extra} accounts in {took:.1f} s")

    def connect(self, sids: list[int], how: str, receipts: str = "each") -> dict[str, Any]:
        """Open a socket for each account index in ``sids`` (pairs stay in one worker)."""
        todo = [s for s in sids if s not in self.connected]
        refresh_stale(self.stack.base_url, [self.accounts[s] for s in todo])
        n = len(self.pool.workers)
        plan: dict[int, list[tuple[int, str, str]]] = {}
        for sid in todo:
            a = self.accounts[sid]
            index = (sid // 2) % n if how == "pairs" else sid % n
            plan.setdefault(index, []).append((sid, a.user_id, a.token))
        r = self.pool.connect(plan, receipts)
        self.connected.update(s for s in todo if s in self.pool.owner)
        hs = summary(r.pop("handshake_ms"))
        r["handshake_ms"] = hs
        r["per_s"] = round(r["opened"] / r["seconds"], 1) if r["seconds"] else None
        self.say(
            f"  {r['opened']} sockets opened in {r['seconds']:.1f} s ({r['per_s']}/s), handshake p50 {hs['p50']} ms"
            + (f", FAILED {r['failed']}" if r["failed"] else "")
        )
        return r

    def heal(self) -> int:
        """Open again, with fresh tokens, the sockets the server closed (a real client reconnects)."""
        lost = [sid for w in self.pool.workers for sid in w.call("take_lost", timeout=60)]
        lost = [sid for sid in lost if sid in self.connected]
        if not lost:
            return 0
        self.connected.difference_update(lost)
        self.say(f"  reconnecting {len(lost)} sockets the server closed")
        for sid in lost:
            self.pool.owner.pop(sid, None)
        how = "pairs" if all(s < len(self.pair_sids()) for s in lost) else "spread"
        self.connect(lost, how)
        return len(lost)

    def pair_sids(self) -> list[int]:
        return list(range(self.args.users - self.args.users % 2))

    def warm_up(self) -> dict[str, Any]:
        """One message each way on every pair, waited for: conversations exist, devices are known online."""
        tag = self.tag("W")
        sids = [s for s in self.pair_sids() if s in self.connected]
        now = time.monotonic_ns() + 200_000_000
        by_worker: dict[int, list[tuple[int, int, str, str | None, str | None]]] = {}
        for i, sid in enumerate(sids):
            to = self.account_of(self.partner(sid)).user_id
            by_worker.setdefault(self.pool.owner[sid], []).append((now + i * 2_000_000, sid, f"{tag}:{i}", to, None))
        for index, items in by_worker.items():
            self.pool.workers[index].submit("send", items=items)
        done = self.wait_for(tag, len(sids), self.args.drain)
        self.say(f"  warm-up: {done['ids']} of {len(sids)} delivered, {done['acks']} acked")
        return done

    def wait_for(self, tag: str, ids: int, budget_s: float, arrivals: int | None = None) -> dict[str, Any]:
        """Poll the workers until ``ids`` messages of ``tag`` arrived and were acked, or ``budget_s`` ends."""
        self.outstanding[tag] = (ids, arrivals)
        deadline = time.monotonic() + budget_s
        while True:
            p = self.pool.progress(tag)
            done = p.get("ids", 0) >= ids and p.get("acks", 0) >= ids
            if arrivals is not None:
                done = done and p.get("arrivals", 0) >= arrivals
            if done:
                self.outstanding.pop(tag, None)
            if done or time.monotonic() >= deadline:
                p["complete"] = done
                return p
            time.sleep(0.25)

    def quiesce(self) -> dict[str, Any]:
        """Before a phase: wait (at most --quiet-budget s) for what earlier phases left undelivered.

        A phase that starts on a backlog measures the backlog; when the wait
        runs out the phase still runs, and its result says how many earlier
        messages were still on their way.
        """
        healed = self.heal()
        if not self.outstanding:
            return {"reconnected": healed} if healed else {}
        started = time.monotonic()
        deadline = started + self.args.quiet_budget
        while True:
            missing = 0
            for tag, (ids, arrivals) in list(self.outstanding.items()):
                p = self.pool.progress(tag)
                left = max(0, ids - p.get("ids", 0)) + max(0, ids - p.get("acks", 0))
                if arrivals is not None:
                    left = max(left, arrivals - p.get("arrivals", 0))
                if left == 0:
                    self.outstanding.pop(tag)
                missing += left
            if missing == 0 or time.monotonic() >= deadline:
                waited = round(time.monotonic() - started, 1)
                out: dict[str, Any] = {"waited_for_earlier_s": waited}
                if healed:
                    out["reconnected"] = healed
                if missing:
                    self.say(f"  {missing} earlier messages, acks or deliveries still missing after {waited} s")
                    self.outstanding.clear()  # counted once, in this phase's result
                    out["earlier_missing"] = missing
                elif waited >= 1:
                    self.say(f"  waited {waited} s for earlier messages to arrive")
                return out
            time.sleep(0.5)

    # -- phases ---------------------------------------------------------------------

    def floor(self) -> dict[str, Any]:
        """Ping -> pong through Nginx and a gateway on one quiet socket: what any frame pays at least."""
        sid = self.pair_sids()[0]
        w = self.pool.worker_of(sid)
        self.pool.all("phase", tag=self.tag("F"))
        end = self.cpu_window()
        count = self.args.floor_count
        r = w.call("echo", timeout=count * 10 + 60, sid=sid, count=count + 10, per_s=40)
        rtts = r["rtt_ms"][10:]  # the first round trips warm the path up
        lat = summary(rtts, missing=r["lost"])
        self.floor_p50 = lat["p50"]
        return {
            "phase": "floor",
            "name": "echo floor (ping -> pong)",
            "planned": count,
            "sent": count + 10,
            "delivered": len(rtts),
            "latency_ms": lat,
            "complete": r["lost"] == 0,
            "cpu": end(count + 10),
        }

    def idle(self) -> dict[str, Any]:
        """The connected sockets and no traffic: what the stack costs doing nothing."""
        self.pool.all("phase", tag=self.tag("I"))
        time.sleep(self.args.settle)
        before = self.pool.all("status")
        end = self.cpu_window()
        time.sleep(self.args.idle_seconds)
        c = end(0)
        after = self.pool.all("status")
        closed = sum(a["closed_by_server"] - b["closed_by_server"] for a, b in zip(after, before, strict=True))
        return {
            "phase": "idle",
            "name": f"idle, {len(self.connected)} sockets",
            "sockets": len(self.connected),
            "seconds": self.args.idle_seconds,
            "closed_by_server": closed,
            "complete": True,
            "cpu": c,
        }

    def one_at_a_time(self) -> dict[str, Any]:
        """Send, wait for the recipient's frame, next; pairs of one worker take turns."""
        tag = self.tag("O")
        w = self.pool.workers[0]
        mine = [s for s in self.pair_sids() if self.pool.owner.get(s) == 0 and s % 2 == 0]
        pairs = [
            (s, s + 1, self.account_of(s).user_id, self.account_of(s + 1).user_id)
            for s in mine
            if s + 1 in self.connected
        ]
        count = self.args.one_count
        self.pool.all("phase", tag=tag)
        end = self.cpu_window()
        r = w.call(
            "one_at_a_time",
            timeout=self.args.one_budget + 60,
            tag=tag,
            pairs=pairs,
            count=count,
            timeout_s=10.0,
            budget_s=self.args.one_budget,
        )
        # Acks and receipts of the last messages are still on their way: give them a moment.
        self.wait_for(tag, r["done"], 5)
        c = end(r["done"] + r["timeouts"])
        sent = r["done"] + r["timeouts"]
        # Messages the budget left unsent are not latencies: only what was sent ranks.
        res = self.message_result("one", f"one at a time ({len(pairs)} pairs)", tag, sent, c)
        res["planned"] = count
        res["complete"] = r["done"] == count
        if sent < count:
            res["note"] = f"budget of {self.args.one_budget:.0f} s spent after {sent} of {count} messages"
        res["timeouts"] = r["timeouts"]
        return res

    def open_loop(self, name: str, tag: str, rate: float, seconds: float, profile: bool = False) -> dict[str, Any]:
        """``rate`` msgs/s between the pairs for ``seconds``, then wait (at most the drain budget) for the rest."""
        sids = [s for s in self.pair_sids() if s in self.connected]
        t0 = time.monotonic_ns() + 1_000_000_000  # time to hand the plan to the workers
        plan = schedule.open_loop(rate, seconds, sids, t0)
        parts = schedule.split(plan, lambda s: self.pool.owner[s])
        self.pool.all("phase", tag=tag)
        futs = []
        for index, part in parts.items():
            items = [
                (p.at_ns, p.sender, f"{tag}:{p.i}", self.account_of(self.partner(p.sender)).user_id, None) for p in part
            ]
            futs.append(self.pool.workers[index].submit("send", items=items))
        _sleep_until(t0)
        end = self.cpu_window()
        prof: dict[str, Any] = {}
        profiler = None
        if profile:
            profiler = threading.Thread(target=self.profile, args=(t0, rate, prof), daemon=True)
            profiler.start()
        for f in futs:
            f.result(seconds + 600)
        sent_at = time.monotonic()
        done = self.wait_for(tag, len(plan), self.args.drain)
        if profiler is not None:
            profiler.join(self.args.profile_seconds + self.args.profile_sample + 90)
            if profiler.is_alive():
                prof.setdefault("error", "the profiler was still running when the phase ended")
        c = end(len(plan))
        res = self.message_result("ladder", name, tag, len(plan), c)
        res["rate"] = rate
        res["seconds"] = seconds
        res["complete"] = done["complete"]
        res["drain_s"] = round(time.monotonic() - sent_at, 2)
        res["delivered_per_s"] = round(res["delivered"] / (seconds + res["drain_s"]), 1)
        if not done["complete"]:
            res["note"] = (
                f"drain budget of {self.args.drain:.0f} s spent: {len(plan) - res['delivered']} undelivered, "
                f"{len(plan) - res['acked']} unacked; missing messages count as later than any measured"
            )
        if prof:
            res["profile"] = prof
        return res

    def ladder(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The rates in order until the first whose p99 passes the limit (never before ``ladder_min``)."""
        steps: list[dict[str, Any]] = []
        limit = self.args.p99_limit
        passed: list[float] = []
        stopped = None
        for rate in self.args.rates:
            profile = self.args.profile and rate == self.args.profile_rate
            name = f"{rate:g} msgs/s"
            self.say(f"== ladder: {name} for {self.args.seconds:g} s" + (" (profiled)" if profile else ""))
            quiet = self.quiesce()
            r = self.open_loop(name, self.tag(f"L{rate:g}"), rate, self.args.seconds, profile)
            r.update(quiet)
            steps.append(r)
            self.print_result(r)
            p99 = r["latency_ms"]["p99"]
            ok = p99 is not None and p99 <= limit
            if ok:
                passed.append(rate)
            if not ok and rate >= self.args.ladder_min:
                stopped = f"stopped after {name}: p99 {_ms(p99)}, over the {limit:g} ms limit"
                self.say("  " + stopped)
                break
            time.sleep(self.args.pause)
        summary_ = {
            "p99_limit_ms": limit,
            "highest_rate_within_limit": max(passed) if passed else None,
            "rates_within_limit": passed,
            "stopped": stopped,
        }
        return steps, summary_

    def group(self) -> dict[str, Any]:
        """One group of ``group_members``, all connected; latency to the first and the last member."""
        members = self.args.group_members
        sids = list(range(members))
        owner = self.accounts[0]
        # Tokens of accounts made long ago have expired (the owner's is needed right now).
        refresh_stale(self.stack.base_url, self.accounts[:members])
        self.say(f"  creating a group of {members}...")
        t = time.monotonic()
        r = requests.post(
            f"{self.stack.base_url}/v1/groups",
            json={"name": "bench", "members": [a.user_id for a in self.accounts[1:members]]},
            headers={"Authorization": f"Bearer {owner.token}"},
            timeout=600,
        )
        r.raise_for_status()
        gid = r.json()["group_id"]
        created_s = time.monotonic() - t
        receipts = self.args.group_receipts
        conn = self.connect(sids, "spread", receipts)
        self.pool.all("receipts", mode=receipts, sids=sids)
        fan = members - 1
        # Warm-up: one message must reach every member before measuring (live views caught up).
        wtag = self.tag("GW")
        osid = 0
        self.pool.worker_of(osid).submit("send", items=[(time.monotonic_ns(), osid, f"{wtag}:0", None, gid)]).result(60)
        warm = self.wait_for(wtag, 1, self.args.drain, arrivals=fan)
        self.say(f"  warm-up group message: {warm.get('arrivals', 0)} of {fan} members")
        time.sleep(self.args.settle)
        tag = self.tag("G")
        count = self.args.group_messages
        rate = self.args.group_rate
        t0 = time.monotonic_ns() + 500_000_000
        plan = schedule.open_loop(rate, count / rate, [osid], t0)
        self.pool.all("phase", tag=tag)
        sending = self.pool.worker_of(osid).submit(
            "send", items=[(p.at_ns, osid, f"{tag}:{p.i}", None, gid) for p in plan]
        )
        _sleep_until(t0)
        end = self.cpu_window()
        sending.result(count / rate + 600)
        sent_at = time.monotonic()
        done = self.wait_for(tag, len(plan), self.args.drain, arrivals=len(plan) * fan)
        drain_s = time.monotonic() - sent_at
        c = end(len(plan))
        got = self.pool.collect(tag, per_id=True)
        rows = got["per_id"].values()
        firsts = [row[1] for row in rows]
        lasts = [row[2] for row in rows if row[0] >= fan]
        deliveries = sum(int(row[0]) for row in rows)
        # Each message's latency to its last member, in sending order (a periodic stall shows as a pattern).
        by_index = sorted((int(cid.rsplit(":", 1)[1]), row[2]) for cid, row in got["per_id"].items() if row[0] >= fan)
        res = {
            "phase": "group",
            "name": f"group fan-out, {members} members",
            "members": members,
            "group_created_s": round(created_s, 2),
            "connect": conn,
            "warm_up_complete": warm["complete"],
            "planned": len(plan),
            "rate": rate,
            "sent": got["sent"] - got["send_failed"],
            "acked": len(got["acks_ms"]),
            "delivered": len(lasts),
            "deliveries": deliveries,
            "deliveries_expected": len(plan) * fan,
            "duplicates": got["duplicates"],
            "errors": got["errors"],
            "first_ms": summary(firsts, missing=len(plan) - len(firsts)),
            "latency_ms": summary(lasts, missing=len(plan) - len(lasts)),
            "last_by_message_ms": [round(ms, 1) for _, ms in by_index],
            "all_deliveries_ms": summary(got["lat_ms"], missing=len(plan) * fan - deliveries),
            "ack_ms": summary(got["acks_ms"], missing=len(plan) - len(got["acks_ms"])),
            "send_lag_ms": summary(got["lag_ms"]),
            "complete": done["complete"],
            "drain_s": round(drain_s, 2),
            "receipts": self.args.group_receipts,
            "cpu": c,
        }
        if deliveries:
            res["cpu"]["us_per_delivery"] = round(c["stack_s"] * 1e6 / deliveries, 1)
        res["x_floor"] = self.x_floor(res["latency_ms"])
        if not done["complete"]:
            res["note"] = (
                f"drain budget of {self.args.drain:.0f} s spent: {len(plan) - len(lasts)} of {len(plan)} messages "
                f"did not reach every member ({len(plan) * fan - deliveries} deliveries missing)"
            )
        # The 1-to-1 sockets stay; the others go, so later phases run on the same system as before.
        extra = [s for s in sids if s >= len(self.pair_sids())]
        by_worker: dict[int, list[int]] = {}
        for s in extra:
            by_worker.setdefault(self.pool.owner[s], []).append(s)
        for index, group_sids in by_worker.items():
            self.pool.workers[index].call("disconnect", timeout=120, sids=group_sids)
        self.connected.difference_update(extra)
        self.pool.all("receipts", mode="each")
        return res

    def catch_up(self) -> dict[str, Any]:
        """A device comes back to ``catchup`` pending messages in one conversation: time until it has all."""
        n = self.args.catchup
        sender, device = self.extra[0], self.extra[1]
        refresh_stale(self.stack.base_url, self.extra)
        w = self.pool.workers[0]
        tag = self.tag("C")
        self.pool.all("phase", tag=tag)
        dev_sid = CATCHUP_SID
        # The device has been online once, then goes away.
        w.call("connect", timeout=120, sockets=[(dev_sid, device.user_id, device.token)])
        time.sleep(1)
        w.call("disconnect", timeout=60, sids=[dev_sid])
        k = self.args.catchup_senders
        send_sids = [CATCHUP_SID + 1 + i for i in range(k)]
        # k sockets of the sender's one device: each stays under the gateway's per-socket frame limit.
        w.call("connect", timeout=120, sockets=[(s, sender.user_id, sender.token) for s in send_sids], receipts="off")
        time.sleep(self.args.settle)
        self.say(f"  filling {n} messages from {k} sockets of one device...")
        budget = 120 + n / 20
        fill = w.call(
            "fill",
            timeout=budget + 120,
            tag=tag,
            sids=send_sids,
            to=device.user_id,
            count=n,
            per_socket_rate=40.0,
            window=500,
            budget_s=budget,
        )
        self.say(f"  {fill['acked']} of {n} acked in {fill['seconds']:.1f} s")
        w.call("disconnect", timeout=60, sids=send_sids)
        time.sleep(self.args.settle)
        refresh_stale(self.stack.base_url, [device], max_age_s=0)
        end = self.cpu_window()
        got = w.call(
            "catch_up",
            timeout=self.args.catchup_budget + 120,
            tag=tag,
            sid=dev_sid,
            user_id=device.user_id,
            token=device.token,
            conversation=dm_id(sender.user_id, device.user_id),
            count=fill["acked"],
            budget_s=self.args.catchup_budget,
        )
        c = end(got["received"])
        w.call("disconnect", timeout=60, sids=[dev_sid])
        complete = got["all_ms"] is not None and got["received"] >= n
        res: dict[str, Any] = {
            "phase": "catchup",
            "name": f"catch-up of {n} pending messages",
            "planned": n,
            "fill": {k2: round(v, 2) if isinstance(v, float) else v for k2, v in fill.items()},
            "acked": fill["acked"],
            "delivered": got["received"],
            "in_order": got["in_order"],
            "duplicates": got["duplicates"],
            "seconds_to_all": round(got["all_ms"] / 1000, 2) if got["all_ms"] is not None else None,
            "handshake_ms": round(got["handshake_ms"], 2),
            "first_message_ms": round(got["first_ms"], 2) if got["first_ms"] is not None else None,
            "per_s": round(got["received"] / (got["last_ms"] / 1000), 1) if got["last_ms"] else None,
            "complete": complete,
            "cpu": c,
        }
        if not complete:
            res["note"] = (
                f"{got['received']} of {fill['acked']} acked messages arrived within the "
                f"{self.args.catchup_budget:.0f} s budget"
                + (f"; only {fill['acked']} of {n} were acked while filling" if fill["acked"] < n else "")
            )
        if not got["in_order"]:
            res["note"] = (res.get("note", "") + "; messages arrived OUT OF seq ORDER").lstrip("; ")
        return res

    # -- shared figures -----------------------------------------------------------

    def message_result(self, phase: str, name: str, tag: str, planned: int, c: dict[str, Any]) -> dict[str, Any]:
        """The common figures of a message phase; ``planned`` messages were due, the missing rank last."""
        got = self.pool.collect(tag)
        delivered = got["ids"]
        acked = len(got["acks_ms"])
        res: dict[str, Any] = {
            "phase": phase,
            "name": name,
            "tag": tag,
            "planned": planned,
            "sent": got["sent"] - got["send_failed"],
            "send_failed": got["send_failed"],
            "acked": acked,
            "delivered": delivered,
            "duplicates": got["duplicates"],
            "errors": got["errors"],
            "latency_ms": summary(got["lat_ms"], missing=max(0, planned - delivered)),
            "ack_ms": summary(got["acks_ms"], missing=max(0, planned - acked)),
            "send_lag_ms": summary(got["lag_ms"]),
            "cpu": c,
        }
        res["x_floor"] = self.x_floor(res["latency_ms"])
        return res

    def x_floor(self, lat: dict[str, Any]) -> dict[str, float | None]:
        return {k: times_floor(lat.get(k), self.floor_p50) for k in ("p50", "p99", "p99.9", "max")}

    def late_arrivals(self, results: list[dict[str, Any]]) -> None:
        """Messages that arrived after their phase was reported: counted now, beside the phase."""
        for r in results:
            tag = r.get("tag")
            if not tag or r["phase"] not in ("one", "ladder"):
                continue
            p = self.pool.progress(tag)
            late = p.get("ids", 0) - r["delivered"]
            if late > 0:
                r["delivered_after_phase"] = late

    def print_result(self, r: dict[str, Any]) -> None:
        from .report import phase_lines

        for line in phase_lines(r):
            self.say("  " + line)

    # -- profile ------------------------------------------------------------------

    def python_pids(self) -> dict[int, str]:
        """The stack's Python processes (services' masters and workers, SecantusDB), with a label."""
        snap = cpu.snapshot()
        out: dict[int, str] = {}
        for name, root in self.roots.items():
            for pid in cpu.tree(snap, root):
                try:
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if any(b"python" in a for a in argv[:2]):
                    role = "" if pid == root else " worker"
                    out[pid] = f"{name}{role}"
        return out

    def profile(self, t0_ns: int, rate: float, out: dict[str, Any]) -> None:
        """Find the busiest Python process early in the phase, then record a py-spy flame graph of it."""
        try:
            _sleep_until(t0_ns + 1_000_000_000)
            candidates = self.python_pids()
            before = cpu.snapshot()
            time.sleep(self.args.profile_sample)
            after = cpu.snapshot()
            ranked = cpu.busiest(before, after, candidates)
            if not ranked:
                out["error"] = "no Python process found"
                return
            pid, busy = ranked[0]
            svg = self.out_dir / f"profile-{rate:g}.svg"
            svg.parent.mkdir(parents=True, exist_ok=True)
            out.update(
                {
                    "process": candidates[pid],
                    "pid": pid,
                    "cores_when_chosen": round(busy / self.args.profile_sample, 3),
                    "ranking": [[candidates[p], round(s / self.args.profile_sample, 3)] for p, s in ranked[:6]],
                    "seconds": self.args.profile_seconds,
                }
            )
            self.say(f"  profiling {candidates[pid]} (pid {pid}, {out['cores_when_chosen']:.0%} of a core)")
            spy = Path(sys.executable).parent / "py-spy"
            cmd = [str(spy), "record", "-p", str(pid), "-d", str(int(self.args.profile_seconds))]
            cmd += ["-o", str(svg), "-f", "flamegraph", "--nonblocking"]
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=self.args.profile_seconds + 60)
            except subprocess.TimeoutExpired:
                out["error"] = (
                    f"py-spy did not finish within {self.args.profile_seconds + 60:g} s (machine overloaded?)"
                )
                return
            if p.returncode == 0 and svg.exists():
                out["svg"] = str(svg)
            else:
                out["error"] = (p.stderr or p.stdout)[-500:]
        except Exception:
            out["error"] = traceback.format_exc()[-1000:]


def _self_pid() -> int:
    import os

    return os.getpid()


def _sleep_until(t_ns: int) -> None:
    delay = (t_ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        time.sleep(delay)


def _ms(v: float | None) -> str:
    return "> budget" if v is None else f"{v:g} ms"


def new_nonce() -> str:
    """Client ids of this run start with it (a stack reused across runs never mixes two runs)."""
    return "b" + uuid.uuid4().hex[:6]
