"""The short fault campaign (issue 13): kill -9 of every process of the message path in turn,
stalls of persistence, a gateway and the broker, and the loss of the embedded broker (kill -9:
it comes back empty, and the services rebuild it while they run), under open-loop traffic
from careful clients; the history checker must find nothing lost, duplicated under two seqs, out of
order, mismatched with the stored history, or left unacknowledged.

The long campaign (every fault, the database and the broker included, at 100 msgs/s) is
``make faults`` (tests/faults.py), which writes its line to docs/faults.md.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.faults import Campaign, short_faults, supervised_stack


def _say(log: list[str]) -> Callable[[str], None]:
    """Keep each line for the report, and print it too: captured, it is shown even when the
    test is stopped by its timeout (which leaves no report of its own)."""

    def say(line: str) -> None:
        log.append(line)
        print(line, flush=True)

    return say


# Under two minutes here; one CI run took past the default 300 s and was stopped mid-drain with
# no report. 600 s leaves room for slow recoveries, and each fault's line is printed as it comes,
# so a run stopped by the timeout still shows how far it got.
@pytest.mark.timeout(600)
def test_nothing_acknowledged_is_lost_when_every_service_is_killed_or_stalled_in_turn() -> None:
    log: list[str] = []
    say = _say(log)
    with supervised_stack(gateways=2, say=say) as stack:
        campaign = Campaign(stack, users=6, rate=20.0, say=say)
        faults = short_faults(stack)
        summary = campaign.run(faults, drain_s=90.0)
    report = "\n".join([summary.line(), *summary.problems[:30], *log[-40:]])
    print(summary.line())  # shown with -s, and in the report of a failure
    assert summary.faults == len(faults), report
    assert summary.sent > 0 and summary.acked == summary.sent, report
    assert summary.not_back == [], report
    assert (summary.lost, summary.conflicts, summary.out_of_order, summary.mismatches, summary.unacked) == (
        0,
        0,
        0,
        0,
        0,
    ), report
    # Every kill was a restart by the supervisor, not a process left dead.
    killed = {f.key for f in faults if f.kind == "kill"}
    assert set(campaign.recoveries) >= {f"kill {k}" for k in killed}, report
