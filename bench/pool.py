"""The controller's side of the worker processes: start them, call them, merge what they saw.

Each worker gets its commands on one pipe and answers on another; a thread
per worker reads the answers and resolves the matching future, so the
controller can ask for progress while a long command (a send schedule) is
still running in the same worker.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import threading
from collections import Counter
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any

from . import worker


class WorkerError(RuntimeError):
    """A worker command raised; the message is the worker's traceback."""


class Handle:
    """One worker process."""

    def __init__(self, ctx: Any, index: int, ws_url: str, nonce: str):
        cmd_r, self._cmd = ctx.Pipe(duplex=False)
        self._rep, rep_w = ctx.Pipe(duplex=False)
        self.index = index
        self.process = ctx.Process(
            target=worker.main, args=(index, ws_url, nonce, cmd_r, rep_w), name=f"bench-worker-{index}", daemon=True
        )
        self.process.start()
        cmd_r.close()
        rep_w.close()
        self._ids = itertools.count()
        self._pending: dict[int, Future[Any]] = {}
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, args=(self._rep,), daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return int(self.process.pid)

    def _read(self, rep: Connection) -> None:
        while True:
            try:
                msg = rep.recv()
            except (EOFError, OSError):
                break
            fut = self._pending.pop(msg["rid"], None)
            if fut is None:
                continue
            if msg["ok"]:
                fut.set_result(msg["result"])
            else:
                fut.set_exception(WorkerError(f"worker {self.index}: {msg['result']}"))
        for fut in list(self._pending.values()):
            if not fut.done():
                fut.set_exception(WorkerError(f"worker {self.index} exited"))

    def submit(self, op: str, **args: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        with self._lock:
            rid = next(self._ids)
            self._pending[rid] = fut
            self._cmd.send({"rid": rid, "op": op, "args": args})
        return fut

    def call(self, op: str, timeout: float | None = None, **args: Any) -> Any:
        return self.submit(op, **args).result(timeout)

    def stop(self) -> None:
        if self.process.is_alive():
            try:
                self.call("exit", timeout=15)
            except Exception:
                pass
            self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


class Pool:
    """All the workers, and which worker owns which socket id."""

    def __init__(self, count: int, ws_url: str, nonce: str):
        ctx = mp.get_context("spawn")  # no inherited threads or event loop state
        self.workers = [Handle(ctx, i, ws_url, nonce) for i in range(count)]
        self.owner: dict[int, int] = {}

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self.workers]

    def worker_of(self, sid: int) -> Handle:
        return self.workers[self.owner[sid]]

    def all(self, op: str, timeout: float | None = None, **args: Any) -> list[Any]:
        """The same command in every worker at once; the answers in worker order."""
        futs = [w.submit(op, **args) for w in self.workers]
        return [f.result(timeout) for f in futs]

    def connect(
        self, sockets: dict[int, list[tuple[int, str, str]]], receipts: str = "each", timeout: float = 600
    ) -> dict[str, Any]:
        """Open sockets: worker index -> [(sid, user_id, token)]; merged answer of all workers."""
        futs = []
        for index, socks in sockets.items():
            for sid, _, _ in socks:
                self.owner[sid] = index
            futs.append(self.workers[index].submit("connect", sockets=socks, receipts=receipts))
        merged: dict[str, Any] = {"opened": 0, "failed": Counter(), "seconds": 0.0, "handshake_ms": []}
        for f in futs:
            r = f.result(timeout)
            merged["opened"] += r["opened"]
            merged["failed"].update(r["failed"])
            merged["seconds"] = max(merged["seconds"], r["seconds"])
            merged["handshake_ms"] += r["handshake_ms"]
        merged["failed"] = dict(merged["failed"])
        return merged

    def progress(self, tag: str) -> dict[str, int]:
        total: Counter[str] = Counter()
        for r in self.all("progress", timeout=60, tag=tag):
            total.update(r)
        return dict(total)

    def collect(self, tag: str, per_id: bool = False) -> dict[str, Any]:
        """One phase's figures from every worker, merged (per-id rows merged by client id)."""
        merged: dict[str, Any] = {
            "lat_ms": [],
            "acks_ms": [],
            "lag_ms": [],
            "sent": 0,
            "send_failed": 0,
            "duplicates": 0,
            "errors": Counter(),
            "per_id": {},
            "ids": 0,
        }
        for r in self.all("collect", timeout=120, tag=tag, per_id=per_id):
            for key in ("lat_ms", "acks_ms", "lag_ms"):
                merged[key] += r[key]
            for key in ("sent", "send_failed", "duplicates", "ids"):
                merged[key] += r[key]
            merged["errors"].update(r["errors"])
            for cid, (n, first, last) in r["per_id"].items():
                row = merged["per_id"].get(cid)
                if row is None:
                    merged["per_id"][cid] = [n, first, last]
                else:
                    row[0] += n
                    row[1] = min(row[1], first)
                    row[2] = max(row[2], last)
        if per_id:
            merged["ids"] = len(merged["per_id"])
        merged["errors"] = dict(merged["errors"])
        return merged

    def stop(self) -> None:
        for w in self.workers:
            w.stop()
