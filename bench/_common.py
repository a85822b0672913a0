"""Helpers shared by the benchmark modules: results, report tables, clean worker processes.

A benchmark module (``bench/<name>.py``) defines ``TITLE`` and ``run(quick: bool) ->
list[Result]``; it prints its own detailed sections while it runs and returns the headline
numbers, which ``python -m bench`` repeats in the summary with their targets. A stand-alone
module (``main(argv)``, also run as ``python -m bench.<name>``) hands its judged numbers to
:func:`record` instead, and the summary takes them from there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MB = 1024 * 1024
WORKER_TIMEOUT = 900.0  # seconds; every worker loop is bounded, this only guards a hang


class BenchError(RuntimeError):
    """A benchmark could not run (a worker failed or produced no result)."""


@dataclass(frozen=True, slots=True)
class Result:
    """One headline number. ``passed`` is None when no target applies (or it is not judged)."""

    name: str
    value: float
    unit: str
    target: str = ""
    passed: bool | None = None
    note: str = ""
    shown: str = ""  # the value as the module printed it, when it formats it itself

    def value_text(self) -> str:
        if self.shown:
            return self.shown
        if self.unit == "changes/s":
            return f"{self.value:,.0f} {self.unit}"
        if self.unit == "s" and self.value < 0.1:
            return f"{self.value * 1000:.1f} ms"
        return f"{self.value:,.2f} {self.unit}"

    def mark(self) -> str:
        return {True: "PASS", False: "FAIL", None: "-"}[self.passed]


def at_most(name: str, value: float, unit: str, limit: float, *, judge: bool = True) -> Result:
    target = f"< {limit:g} {unit}"
    return Result(name, value, unit, target, (value < limit) if judge else None)


def at_least(name: str, value: float, unit: str, limit: float, *, judge: bool = True) -> Result:
    target = f">= {limit:,.0f} {unit}"
    return Result(name, value, unit, target, (value >= limit) if judge else None)


_recorded: list[Result] = []


def record(
    name: str, value: float, unit: str, target: str, passed: bool | None, *, shown: str = ""
) -> None:
    """Keep one judged number of a stand-alone benchmark for the summary."""
    _recorded.append(Result(name, value, unit, target, passed, shown=shown))


def take_recorded() -> list[Result]:
    """The numbers :func:`record` kept since the last call."""
    taken = list(_recorded)
    _recorded.clear()
    return taken


def section(title: str) -> None:
    print(f"\n== {title} ==", flush=True)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "  ") -> None:
    """Print rows as aligned columns: the first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        parts = [
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)
        ]
        print(indent + "  ".join(parts).rstrip())
        if n == 0:
            print(indent + "  ".join("-" * w for w in widths))
    sys.stdout.flush()


def results_table(results: Sequence[Result], indent: str = "  ") -> None:
    table(
        ("measure", "result", "target", ""),
        [(r.name, r.value_text(), r.target or "-", r.mark()) for r in results],
        indent,
    )


# -- worker processes ----------------------------------------------------------------------


def run_worker(module: str, args: Sequence[str], *, timeout: float = WORKER_TIMEOUT) -> Any:
    """Run ``python -m <module> <args>`` in a fresh interpreter; return the JSON it prints last."""
    try:
        proc = subprocess.run(
            [sys.executable, "-m", module, *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"{module} {' '.join(args)}: no result after {timeout:.0f}s") from None
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise BenchError(f"{module} {' '.join(args)} exited {proc.returncode}:\n{tail}")
    return json.loads(lines[-1])


def proc_status_bytes(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM, ...) in bytes; 0 when unavailable."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def malloc_trim() -> bool:
    """Ask glibc to hand free heap memory back to the kernel; False when not glibc."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False
