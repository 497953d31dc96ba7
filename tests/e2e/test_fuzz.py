"""The API fuzzed against docs/openapi.yaml, through Nginx, every check on (tests/fuzzing.py).

A bounded run (a few thousand cases): no 5xx, no response the reference does
not describe, no request the reference calls invalid accepted, every documented
operation reached with a valid token. `make fuzz` runs the same for longer.
"""

from __future__ import annotations

import pytest

from helper.stack import Stack
from tests.fuzzing import run

#: Examples per operation and phase: with the coverage phase's cases, a few thousand in all.
MAX_EXAMPLES = 25
SEED = 20261201
#: The stateful phase (chains of operations along the reference's links) runs in `make fuzz`.
PHASES = "examples,coverage,fuzzing"


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_api_holds_to_its_reference_under_fuzzing(stack: Stack) -> None:
    admin = (stack.env["ADMIN_USERNAME"], stack.env["ADMIN_PASSWORD"])
    result = run(stack.base_url, admin, MAX_EXAMPLES, SEED, phases=PHASES)
    report = result.output[-8000:]
    assert result.operations_tested == result.operations_total, report
    assert result.cases >= 1000, report
    assert not result.failures, report
    assert not result.errors, report
    assert result.exit_code == 0, report
