"""Mutation score of the modules listed under ``[tool.mutmut]`` in pyproject.toml.

Runs ``mutmut run`` (extra arguments are passed on, e.g. ``--max-children 2``),
then prints one line per module: mutants, killed, surviving and the score.
A mutant that no selected test reaches ("no tests", e.g. code that runs only
in a child process) counts as surviving, like one that the tests let live.
Mutants argued to be equivalent are listed, each with its reason, in
``tests/mutation-equivalent.txt`` (``name  # why``); they leave the count, at
most 5% of a module's. Exits 1 when a module scores under ``--min`` (90).

    python scripts/mutation.py                 # run, then report
    python scripts/mutation.py --report-only   # report the last run
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENT = ROOT / "tests" / "mutation-equivalent.txt"
KILLED = {"killed", "timeout", "segfault", "caught by type check"}
SURVIVING = {"survived", "no tests", "suspicious"}


def equivalent_mutants() -> dict[str, str]:
    found: dict[str, str] = {}
    if EQUIVALENT.exists():
        for line in EQUIVALENT.read_text().splitlines():
            name, _, why = line.partition("#")
            if name.strip():
                found[name.strip()] = why.strip()
    return found


def results() -> dict[str, str]:
    out = subprocess.run(
        [sys.executable, "-m", "mutmut", "results", "--all", "true"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    status = {}
    for line in out.splitlines():
        name, sep, state = line.strip().rpartition(": ")
        if sep:
            status[name] = state
    return status


def module_of(mutant: str) -> str:
    # vaccelray.protocol.frames.xǁFrameDecoderǁfeed__mutmut_3 -> vaccelray.protocol.frames
    return ".".join(part for part in mutant.split(".") if not part.startswith("x"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--min", type=float, default=90.0, help="lowest score passing (percent)")
    parser.add_argument("--list", action="store_true", help="name every surviving mutant")
    args, mutmut_args = parser.parse_known_args()
    if not args.report_only:
        subprocess.run([sys.executable, "-m", "mutmut", "run", *mutmut_args], cwd=ROOT, check=False)
    status = results()
    equivalent = equivalent_mutants()
    by_module: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for name, state in status.items():
        if name in equivalent:
            kind = "equivalent"
        elif state in KILLED:
            kind = "killed"
        elif state in SURVIVING:
            kind = "surviving"
        else:
            kind = "unchecked"
        by_module[module_of(name)][kind].append(name)
    failed = False
    print(f"{'module':40} {'mutants':>7} {'killed':>6} {'surv.':>5} {'equiv.':>6} {'score':>6}")
    for module in sorted(by_module):
        kinds = by_module[module]
        total = sum(len(v) for v in kinds.values())
        eq = len(kinds["equivalent"])
        counted = total - eq
        killed = len(kinds["killed"])
        score = 100.0 * killed / counted if counted else 100.0
        too_many_equivalent = eq > 0.05 * total
        low = score < args.min or too_many_equivalent or bool(kinds["unchecked"])
        failed |= low
        print(
            f"{module:40} {total:7} {killed:6} {len(kinds['surviving']):5} {eq:6} "
            f"{score:5.1f}%{'  <-- below target' if low else ''}"
        )
        if too_many_equivalent:
            print(f"  {eq} equivalent mutants are over 5% of {total}")
        for name in kinds["unchecked"]:
            print(f"  not checked: {name} ({status[name]})")
        if args.list:
            for name in kinds["surviving"]:
                print(f"  {status[name]}: {name}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
