"""The connection phase's pure parts: /proc parsing, per-socket arithmetic, planning, the docs section."""

from __future__ import annotations

import argparse
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from bench import connections as c
from bench.run import PHASES, parse_args

STATUS = """Name:\tgunicorn
VmPeak:\t  300000 kB
VmRSS:\t  143512 kB
RssAnon:\t  120000 kB
"""


def test_vm_rss_is_read_from_proc_status() -> None:
    assert c.vm_rss_kib(STATUS) == 143512
    assert c.vm_rss_kib("Name:\tzombie\nState:\tZ (zombie)\n") == 0


def test_the_phase_reads_its_own_process_from_proc() -> None:
    assert c.vm_rss_kib(Path("/proc/self/status").read_text()) > 1000


def test_per_socket_growth_is_measured_from_the_baseline() -> None:
    assert c.per_socket_kib(100_000, [(1000, 117_000), (10_000, 270_000)]) == [17.0, 17.0]
    assert c.per_socket_kib(100_000, [(0, 100_000)]) == [None]


def test_slope_is_what_one_more_socket_costs_whatever_the_baseline() -> None:
    assert c.slope_kib([(1000, 50_000), (5000, 118_000), (10_000, 203_000)]) == 17.0
    assert c.slope_kib([(1000, 50_000)]) is None
    assert c.slope_kib([(1000, 50_000), (1000, 60_000)]) is None


def test_sockets_are_spread_round_robin_over_the_workers() -> None:
    plan = c.spread([10, 11, 12, 13, 14], 2, lambda sid: (f"u{sid % 2}", f"t{sid}"))
    assert plan == {
        0: [(10, "u0", "t10"), (12, "u0", "t12"), (14, "u0", "t14")],
        1: [(11, "u1", "t11"), (13, "u1", "t13")],
    }


def test_the_gateway_gauge_is_read_from_metrics() -> None:
    text = (
        "# HELP ws_connections Open sockets\n# TYPE ws_connections gauge\nws_connections 10002.0\nws_frames_total 3\n"
    )
    assert c.ws_connections(text) == 10002
    assert c.ws_connections("nothing here\n") is None


def test_a_missed_message_counts_once_it_reached_any_socket_of_its_recipient() -> None:
    expected = {"n:CM:0": "u1", "n:CM:1": "u2", "n:CM:2": "u3"}
    per_id = {"n:CM:0": [3, 10.0, 12.0], "n:CM:2": [1, 5.0, 5.0]}
    assert c.delivered_missed(expected, per_id) == {"sent": 3, "delivered": 2, "lost": 1}


def test_the_section_is_appended_once_then_replaced_and_the_rest_kept() -> None:
    doc = "# Benchmarks\n\nProse.\n\n<!-- bench:start -->\nlead's figures\n<!-- bench:end -->\n"
    once = c.replace_section(doc, "first figures")
    assert once.startswith(doc.rstrip()) and once.count(c.SECTION) == 1 and "first figures" in once
    twice = c.replace_section(once + "\nafter\n", "second figures")
    assert "first figures" not in twice and "second figures" in twice
    assert twice.count(c.SECTION) == 1 and "lead's figures" in twice and twice.endswith("after\n")


def test_the_phase_is_registered_last_with_its_options() -> None:
    assert PHASES[-1] == "connections"
    args = parse_args(["--phases", "connections", "--conn-levels", "1000,5000,10000", "--conn-accounts", "50"])
    assert args.phases == ["connections"] and args.conn_levels == [1000, 5000, 10000] and args.conn_accounts == 50


def test_the_bare_hash_rate_is_measured_with_real_argon2() -> None:
    r = c.hash_rate(("OWASP minimum", 2, 19456, 1), 0.2, 2)
    assert r["per_s"] > 0 and (r["t"], r["m_kib"], r["p"], r["threads"]) == (2, 19456, 1, 2)


class _Auth(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        ok = self.headers.get("Authorization") == "Bearer good"
        self.send_response(200 if ok else 401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_the_auth_sampler_times_a_real_server_by_window() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Auth)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/internal/auth"
        good = c.AuthSampler(url, "good", every_s=0.01).start()
        bad = c.AuthSampler(url, "bad", every_s=0.01).start()
        threading.Event().wait(0.2)
        good.window = "storm"
        threading.Event().wait(0.2)
        got, refused = good.stop(), bad.stop()
    finally:
        server.shutdown()
    assert got["idle"]["n"] > 0 and got["storm"]["n"] > 0 and got["storm"]["failed"] == 0
    assert refused == {}  # no answer but 401: nothing timed
    assert bad.failed["idle"] > 0


def test_options_default_to_the_issues_steps() -> None:
    p = argparse.ArgumentParser()
    c.add_arguments(p)
    assert p.parse_args([]).conn_levels == [1000, 5000, 10000]


def test_the_login_ceiling_is_the_best_bare_rate_at_the_stacks_own_cost() -> None:
    rows = [
        {"cost": c.CONFIGURED, "per_s": 9.8},
        {"cost": "default (RFC 9106 low-memory)", "per_s": 60.0},
        {"cost": c.CONFIGURED, "per_s": 31.0},
    ]
    assert c.ceiling(rows) == 31.0
    assert c.ceiling([]) is None
