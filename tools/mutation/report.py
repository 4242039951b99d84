"""The kill ratio and the surviving mutants of a `make mutation` run, from mutmut's own results.

    python tools/mutation/report.py WORK_DIR REPORT.md --seconds S PATTERN...

Counts only the mutants whose names match a PATTERN (mutmut also generates the out-of-scope functions of a
mutated file, unchecked). A mutant is caught when a test failed, timed out or crashed under it; every other
status (survived, no tests, suspicious, not checked) is listed with its diff.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import fnmatch
import importlib.metadata
import subprocess
import sys
from pathlib import Path

CAUGHT = {"killed", "timeout", "segfault"}


def mutmut(work: Path, *args: str) -> str:
    command = [str(Path(sys.executable).with_name("mutmut")), *args]
    return subprocess.run(command, cwd=work, capture_output=True, text=True, check=True).stdout


def statuses(work: Path, patterns: list[str]) -> dict[str, str]:
    """name -> status of every mutant in scope."""
    found = {}
    for line in mutmut(work, "results", "--all", "true").splitlines():
        name, _, status = line.strip().rpartition(": ")
        if name and any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            found[name] = status
    return found


def module_of(name: str) -> str:
    return name.split(".x")[0]


def report(work: Path, patterns: list[str], seconds: int) -> str:
    found = statuses(work, patterns)
    if not found:
        raise SystemExit(f"no mutant of {work} matches the patterns {patterns}")
    per_module = collections.defaultdict(collections.Counter)
    for name, status in found.items():
        per_module[module_of(name)][status] += 1
    caught = sum(status in CAUGHT for status in found.values())
    left = sorted(name for name, status in found.items() if status not in CAUGHT)
    lines = [
        f"# Mutation testing, {datetime.date.today()}",
        "",
        f"mutmut {importlib.metadata.version('mutmut')}, {len(found)} mutants, wall time {seconds // 60} min "
        f"{seconds % 60} s",
        "",
        f"**Caught {caught} of {len(found)} ({100 * caught / len(found):.1f}%)**; not caught: {len(left)}",
        "",
        "| module | mutants | killed | timeout | crashed | survived | no tests | other |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for module, counts in sorted(per_module.items()):
        named = ("killed", "timeout", "segfault", "survived", "no tests")
        other = sum(n for status, n in counts.items() if status not in named)
        lines.append(f"| {module} | {sum(counts.values())} | " + " | ".join(str(counts[s]) for s in named)
                     + f" | {other} |")
    lines += ["", "## Not caught", ""]
    for name in left:
        lines += [f"### `{name}` ({found[name]})", "", "```diff", mutmut(work, "show", name).strip(), "```", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path, help="the copy mutmut ran in (holds mutants/)")
    parser.add_argument("output", type=Path, help="the Markdown report to write")
    parser.add_argument("--seconds", type=int, default=0, help="wall time of the run")
    parser.add_argument("patterns", nargs="+", help="fnmatch patterns of the mutant names in scope")
    args = parser.parse_args()
    text = report(args.work, args.patterns, args.seconds)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    summary = text.split("## Not caught")[0]
    print(summary + f"Surviving mutants with their diffs: {args.output}")


if __name__ == "__main__":
    main()
