"""``python -m bench`` (``make bench``): run the benchmarks and print one report.

Each name in :data:`BENCHMARKS` is a module ``bench/<name>.py`` that either defines ``TITLE``
and ``run(quick: bool) -> list[Result]`` (its results join the summary), or a stand-alone
``main(argv) -> int`` that prints its own report (run with ``--quick`` when asked); names whose
module does not exist yet are listed as "not written yet" and skipped. Exit status: 0 when
every benchmark ran (whatever its PASS/FAIL marks), 1 when one could not run, 2 for bad
arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import os
import platform
import sys
import time
import traceback
from collections.abc import Sequence

from bench._common import BenchError, Result, results_table, section, take_recorded

BENCHMARKS: tuple[str, ...] = ("store", "kube", "dns", "metadata", "ipam", "overlay", "cattle")
"""Benchmark modules in report order. A later issue adds its ``bench/<name>.py`` (``dns``,
``metadata``, ...) and appends the name here."""


def _available(name: str) -> bool:
    return importlib.util.find_spec(f"bench.{name}") is not None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="small sizes: a smoke test, targets not all judged"
    )
    parser.add_argument(
        "--only",
        metavar="NAME",
        action="append",
        choices=BENCHMARKS,
        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}",
    )
    args = parser.parse_args(argv)
    wanted = args.only or list(BENCHMARKS)
    missing = [name for name in wanted if not _available(name)]
    if args.only and missing:
        parser.error(f"no bench/{missing[0]}.py yet")

    cpus = os.cpu_count() or 1
    load = os.getloadavg()[0]
    print(
        f"node-services benchmarks{' (quick: small sizes)' if args.quick else ''}\n"
        f"python {platform.python_version()} ({platform.python_implementation()}), "
        f"{platform.machine()}, {platform.system()} {platform.release()}, "
        f"{cpus} CPU(s), load average {load:.1f}"
    )
    if load > cpus:
        print("  note: the machine is busy; wall-clock timings will be slower than it can do")
    started = time.perf_counter()
    summary: list[tuple[str, list[Result]]] = []
    failed: list[str] = []
    for name in wanted:
        if name in missing:
            continue
        module = importlib.import_module(f"bench.{name}")
        section(f"{name}: {getattr(module, 'TITLE', module.__doc__ or name).splitlines()[0]}")
        bench_started = time.perf_counter()
        try:
            if not hasattr(module, "run"):
                status = module.main(["--quick"] if args.quick else [])
                if status:
                    print(f"  {name} exited with status {status}", flush=True)
                    failed.append(name)
                print(f"  ({name} took {time.perf_counter() - bench_started:.0f} s)")
                recorded = take_recorded()
                if args.quick:  # small sizes: shown, not judged
                    recorded = [dataclasses.replace(r, passed=None) for r in recorded]
                summary.append((name, recorded))
                continue
            results: list[Result] = module.run(args.quick)
        except (BenchError, OSError) as exc:
            print(f"  ERROR: {exc}", flush=True)
            failed.append(name)
            continue
        except Exception:
            traceback.print_exc()
            failed.append(name)
            continue
        print(f"  ({name} took {time.perf_counter() - bench_started:.0f} s)")
        summary.append((name, results))

    section("summary")
    for name, results in summary:
        print(f"  {name}:")
        results_table(results, indent="    ")
    if missing:
        print(f"  not written yet: {', '.join(missing)}")
    for name in failed:
        print(f"  {name}: ERROR (see above)")
    marks = [r.passed for _, results in summary for r in results if r.passed is not None]
    print(
        f"  targets: {marks.count(True)} PASS, {marks.count(False)} FAIL; "
        f"total {time.perf_counter() - started:.0f} s; load average now {os.getloadavg()[0]:.1f}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
