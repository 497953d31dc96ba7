"""Fuzzing the live system against docs/openapi.yaml with Schemathesis.

The run behind tests/e2e/test_fuzz.py (bounded, part of `make test`) and
`make fuzz` (long; its figures go to docs/fuzzing.md). Every check is on:
a 5xx, a response the reference does not describe (status, headers, content
type, body schema), a request the reference calls invalid that the server
accepts, a method a route does not have that is not a 405 with Allow, and the
rest of Schemathesis's checks. Tokens come from tests/fuzz_hooks.py;
tests/fuzz.toml says which documented 400s a schema-valid request may get.

    python -m tests.fuzzing [--max-examples N] [--seed S]   # what `make fuzz` runs
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helper.infra import ROOT, VENV_BIN

SPEC = ROOT / "docs" / "openapi.yaml"
CONFIG = ROOT / "tests" / "fuzz.toml"
FIGURES = ROOT / "docs" / "fuzzing.md"


@dataclass
class FuzzRun:
    """What one run did and found (from Schemathesis's JSON report)."""

    command: str
    exit_code: int
    seed: int
    seconds: float
    cases: int
    operations_tested: int
    operations_total: int
    failures: list[dict[str, Any]] = field(default_factory=list)
    errors: list[Any] = field(default_factory=list)
    phases: dict[str, Any] = field(default_factory=dict)
    output: str = ""

    @property
    def clean(self) -> bool:
        return self.exit_code == 0 and not self.failures and not self.errors


def run(
    base_url: str,
    admin: tuple[str, str],
    max_examples: int,
    seed: int,
    phases: str = "examples,coverage,fuzzing,stateful",
    workers: int = 1,
    max_time: int | None = None,
    operations: list[str] | None = None,
) -> FuzzRun:
    """Run Schemathesis against ``base_url`` (a running system) and read its report."""
    work = Path(tempfile.mkdtemp(prefix="fuzz-"))
    cmd = [
        str(VENV_BIN / "schemathesis"),
        "--config-file",
        str(CONFIG),
        "run",
        str(SPEC),
        "--url",
        base_url,
        "--checks",
        "all",
        "--max-examples",
        str(max_examples),
        "--phases",
        phases,
        "--seed",
        str(seed),
        "--workers",
        str(workers),
        "--request-timeout",
        "30",
        "--report",
        "json",
        "--report-dir",
        str(work),
    ]
    if max_time:
        cmd += ["--max-time", str(max_time)]
    for operation_id in operations or []:
        cmd += ["--include-operation-id", operation_id]
    env = dict(os.environ)
    env.update(
        {
            "PYTHONPATH": os.pathsep.join([str(ROOT / "libs"), str(ROOT)]),
            "SCHEMATHESIS_HOOKS": "tests.fuzz_hooks",
            "FUZZ_BASE_URL": base_url,
            "FUZZ_ADMIN_USERNAME": admin[0],
            "FUZZ_ADMIN_PASSWORD": admin[1],
            "NO_COLOR": "1",
        }
    )
    try:
        # cwd: Schemathesis keeps a cache directory where it runs.
        out = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
        reports = glob.glob(str(work / "json-*.json"))
        if not reports:
            raise RuntimeError(
                f"schemathesis wrote no report (exit {out.returncode}):\n{out.stdout[-4000:]}{out.stderr}"
            )
        report = json.loads(Path(reports[0]).read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    shown = [a for a in cmd[1:] if a not in (base_url, str(work))]
    shown = [a for i, a in enumerate(shown) if a not in ("--url", "--report-dir")]
    return FuzzRun(
        command=" ".join(["schemathesis", *shown]).replace(str(ROOT) + "/", ""),
        exit_code=out.returncode,
        seed=int(report.get("seed") or seed),
        seconds=float(report["running_time"]),
        cases=int(report["test_cases"]["generated"]),
        operations_tested=int(report["operations"]["tested"]),
        operations_total=int(report["operations"]["total"]),
        failures=list(report.get("failures") or []),
        errors=list(report.get("errors") or []),
        phases=dict(report.get("phases") or {}),
        output=out.stdout + out.stderr,
    )


def figures(result: FuzzRun, max_examples: int) -> str:
    """docs/fuzzing.md: what the long run did and found."""
    failures = sum(int(f.get("count", 1)) for f in result.failures)
    lines = [
        "# Fuzzing the API against its reference",
        "",
        "`make fuzz` runs [Schemathesis](https://schemathesis.readthedocs.io/) against a system it",
        "starts on free loopback ports, driven by `docs/openapi.yaml`: every check (server errors,",
        "status codes, headers, content types and bodies against the reference, invalid requests",
        "accepted, methods a route does not have, links between operations), with valid tokens",
        "(`tests/fuzz_hooks.py`: an operation that revokes its caller's token gets a user of its own",
        "for every case). `make test` runs the same with fewer cases (`tests/e2e/test_fuzz.py`).",
        "This file is written by the last `make fuzz`.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| date | {time.strftime('%Y-%m-%d', time.gmtime())} |",
        f"| cases generated | {result.cases} |",
        f"| operations tested | {result.operations_tested} of {result.operations_total} |",
        f"| examples per operation and phase (at most) | {max_examples} |",
        f"| phases | {', '.join(k for k, v in result.phases.items() if v and v.get('status') != 'skipped') or 'all'} |",
        f"| seed | {result.seed} |",
        f"| duration | {result.seconds / 60:.1f} min |",
        f"| failures (unique) | {failures} |",
        f"| errors | {len(result.errors)} |",
        f"| machine load (1-min average) at the end | {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores |",
        "",
        f"Command: `{result.command}`",
        "",
    ]
    if result.failures:
        lines += ["## Failures", ""]
        for f in result.failures:
            lines.append(f"- {f.get('code')} {f.get('title')}: {', '.join(f.get('operations', []))}")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tests.fuzzing")
    parser.add_argument("--max-examples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--max-time", type=int, default=None, help="seconds for the whole run")
    parser.add_argument(
        "--operation",
        action="append",
        default=[],
        metavar="OPERATION_ID",
        help="fuzz only this operation (repeatable): a check of one finding; docs/fuzzing.md is left as it is",
    )
    args = parser.parse_args(argv)
    from helper.stack import Stack

    var = Path(tempfile.mkdtemp(prefix="chat-fuzz-"))
    stack = Stack.for_tests(var)
    try:
        print(f"starting the system on {stack.base_url}...", flush=True)
        stack.start_all()
        print(f"fuzzing, up to {args.max_examples} examples per operation and phase...", flush=True)
        result = run(
            stack.base_url,
            (stack.env["ADMIN_USERNAME"], stack.env["ADMIN_PASSWORD"]),
            args.max_examples,
            args.seed,
            max_time=args.max_time,
            operations=args.operation,
        )
    finally:
        stack.stop()
        shutil.rmtree(var, ignore_errors=True)
    # The whole of Schemathesis' output (each failure with its curl to reproduce it) is kept
    # next to the project's other run data; the console gets its end.
    full = ROOT / "var" / "fuzz" / f"schemathesis-{result.seed}.txt"
    full.parent.mkdir(parents=True, exist_ok=True)
    full.write_text(result.output)
    print(result.output[-6000:])
    print(f"Schemathesis' whole output: {full.relative_to(ROOT)}")
    if args.operation:
        print(f"{result.cases} cases on {', '.join(args.operation)}, {len(result.failures)} kinds of failure")
        return 0 if result.clean else 1
    FIGURES.write_text(figures(result, args.max_examples))
    print(f"wrote {FIGURES.relative_to(ROOT)}: {result.cases} cases, {len(result.failures)} kinds of failure")
    return 0 if result.clean else 1


if __name__ == "__main__":
    sys.exit(main())
