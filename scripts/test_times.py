"""Where the test suite's minutes go, from the JUnit XML of one run.

    python -m pytest --junitxml=times.xml ...        # any run, the whole suite or a part
    python scripts/test_times.py times.xml [--top 25] [--markdown]

Prints three tables: the time per test file, the time per kind of work, and the slowest tests.
A test's time is pytest's own (setup + call + teardown), so a module-scoped fixture (a reference
run, the planted models of one seed) counts in the first test that uses it.

The kind of a test is the work that dominates it, named by the rules in KINDS below (first match
wins): model training, rsvc run in subprocesses (Python, torch and numba start-up paid per
process), stage pipelines run in-process (extraction, decomposition, regression, importance on
small real or synthetic image sets), and unit/agreement tests. The first numba compile of the session (about a minute
on 2 cores from a clean clone) lands in whichever test first calls a compiled kernel; it is
measured apart (docs/testing.md says how).
"""

from __future__ import annotations

import argparse
import re
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

# (kind, pattern over "path::test name"); first match wins. Patterns name files and tests as they
# are today: a test that matches none is counted as "unit and agreement".
KINDS = [
    ("training (planted models)", r"stages/test_planted\.py::test_(planted|demo)"),
    ("subprocess runs (kill -9, races, sweeps, CLI)",
     r"reliability/test_(kill|concurrent)\.py|store/test_concurrency\.py::test_four|stages/test_sweeps\.py::test_"
     r"(sequential|joblib|submitit|killed|summarize_writes)|stages/test_compare\.py::test_cifar_comparison|"
     r"reliability/test_bad_inputs\.py::test_debug|stages/test_extract\.py::test_(kill_9|cli_user)|tests/cli/|"
     r"viz/test_report_browser\.py"),
    ("stage pipelines in-process (extract to importance; CIFAR or synthetic images)",
     r"stages/test_|reliability/test_|models/test_cifar\.py::test_accuracy_on_full"),
]
OTHER = "unit and agreement"


def read_cases(xml_path: Path) -> list[tuple[str, str, float, str]]:
    """(file, test name, seconds, outcome) of every test case in a JUnit XML."""
    out = []
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        parts = case.get("classname", "").split(".")
        # classname is the module path with dots, then any class names (Test...).
        module = [p for p in parts if p and not p.startswith("Test")]
        path = "/".join(module) + ".py" if module else "(collection)"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = child.tag
        out.append((path, case.get("name", ""), float(case.get("time", 0.0)), outcome))
    return out


def kind_of(path: str, name: str) -> str:
    node = f"{path}::{name}"
    return next((kind for kind, pattern in KINDS if re.search(pattern, node)), OTHER)


def minutes(seconds: float) -> str:
    return f"{seconds / 60:6.1f}"


def table(rows: list[tuple], header: tuple, markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
        lines += ["| " + " | ".join(str(c).strip() for c in row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*map(str, row)) for row in [header, *rows])


def summarize(cases, top: int, markdown: bool) -> str:
    total = sum(t for _, _, t, _ in cases) or 1.0
    share = lambda t: f"{100 * t / total:.0f}%"  # noqa: E731
    by_file: dict[str, list] = defaultdict(lambda: [0.0, 0])
    by_kind: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for path, name, seconds, _ in cases:
        for bucket, key in ((by_file, path), (by_kind, kind_of(path, name))):
            bucket[key][0] += seconds
            bucket[key][1] += 1
    outcomes = defaultdict(int)
    for *_, outcome in cases:
        outcomes[outcome] += 1
    head = (f"{len(cases)} tests, {total / 60:.1f} min in tests "
            f"({', '.join(f'{n} {o}' for o, n in sorted(outcomes.items()))})")
    files = sorted(by_file.items(), key=lambda kv: -kv[1][0])
    kinds = sorted(by_kind.items(), key=lambda kv: -kv[1][0])
    slowest = sorted(cases, key=lambda c: -c[2])[:top]
    return "\n\n".join([
        head,
        table([(f, n, minutes(t), share(t)) for f, (t, n) in files], ("file", "tests", "min", "share"), markdown),
        table([(k, n, minutes(t), share(t)) for k, (t, n) in kinds], ("kind", "tests", "min", "share"), markdown),
        table([(f"{p}::{n}", f"{t:.1f}", kind_of(p, n)) for p, n, t, _ in slowest], ("slowest tests", "s", "kind"),
              markdown),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("xml", type=Path, help="pytest --junitxml output")
    parser.add_argument("--top", type=int, default=25, help="how many of the slowest tests to list")
    parser.add_argument("--markdown", action="store_true", help="tables in Markdown (for docs/testing.md)")
    args = parser.parse_args()
    print(summarize(read_cases(args.xml), args.top, args.markdown))


if __name__ == "__main__":
    main()
