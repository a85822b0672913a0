"""The state cache at cluster scale: snapshot load time, memory, and change rate.

The parent process generates a snapshot (see :mod:`bench.snapshot_gen`) as multi-document
YAML and as a ``kind: List`` JSON file in a temporary directory, then runs every measurement in
a fresh interpreter (``python -m bench.store <mode> ...``) so memory numbers start clean:

- ``load``: ``load_file`` + ``Store.replace``; wall time, peak RSS (VmHWM) during the load, and
  the RSS the loaded cache keeps once the file's parse results are dropped and gc has run;
  plus a walk of the store that estimates bytes per kind of record.
- ``parse``: load_file's two halves apart, in CPU seconds: parsing the file, then translating.
- ``tracemalloc``: the same load under tracemalloc; the bytes of Python objects still allocated
  afterwards (the cache alone, no allocator slack).
- ``apply``: with the snapshot loaded, endpoint-slice upserts (one endpoint's ``ready``
  flipped each) in batches of 1, 100 and 1000 through ``Store.apply``; then full relists
  through ``Store.replace`` with nothing changed and with 1% of the records changed.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import snapshot_gen
from bench._common import (
    MB,
    BenchError,
    Result,
    at_least,
    at_most,
    malloc_trim,
    proc_status_bytes,
    reset_peak_rss,
    run_worker,
    section,
    table,
)

TITLE = "state cache (node_services.state.store)"

SOURCE = "static:bench-snapshot"
LOAD_TARGET_S = 5.0
CACHE_TARGET_MB = 60.0
APPLY_TARGET = 20_000.0  # changes/s at batch size 100
APPLY_TARGET_BATCH = 100
LOAD_REPEATS = 2  # full-size loads run this many times each; the fastest is reported
BATCH_SIZES = (1, 100, 1000)
CHANGES_FULL = 100_000
CHANGES_QUICK = 10_000
RELIST_CHANGED_EVERY = 100  # 1% of the records


# -- parent: generate, run workers, report ------------------------------------------------


def run(quick: bool) -> list[Result]:
    sizes = snapshot_gen.QUICK if quick else snapshot_gen.FULL
    changes = CHANGES_QUICK if quick else CHANGES_FULL
    repeats = 1 if quick else LOAD_REPEATS
    judge = not quick  # load and memory targets are for the full-size snapshot
    with tempfile.TemporaryDirectory(prefix="node-services-bench-") as tmp:
        paths = _generate(Path(tmp), sizes)
        results = _report_load(paths, sizes, repeats, judge)
        results += _report_apply(paths["json"], changes)
    return results


def _generate(tmp: Path, sizes: snapshot_gen.Sizes) -> dict[str, Path]:
    section("store: snapshot")
    paths = {"yaml": tmp / "snapshot.yaml", "json": tmp / "snapshot.json"}
    rows: list[tuple[str, ...]] = []
    for fmt, path in paths.items():
        started = time.perf_counter()
        writer = snapshot_gen.write_yaml if fmt == "yaml" else snapshot_gen.write_json
        objects = writer(path, sizes)
        elapsed = time.perf_counter() - started
        rows.append((fmt, f"{objects:,}", f"{path.stat().st_size / MB:.1f} MB", f"{elapsed:.1f}"))
    print(f"  {sizes.describe()}")
    print("  as kubectl get -o yaml (multi-document) and -o json (kind: List) print them:")
    table(("format", "objects", "size", "generate s"), rows)
    return paths


def _report_load(
    paths: dict[str, Path], sizes: snapshot_gen.Sizes, repeats: int, judge: bool
) -> list[Result]:
    section(
        f"store: load (load_file + Store.replace, fresh process each, best of {repeats})"
        if repeats > 1
        else "store: load (load_file + Store.replace, fresh process)"
    )
    expected = sizes.expected_records()
    loads: dict[str, dict[str, Any]] = {}
    parses: dict[str, dict[str, Any]] = {}
    for fmt, path in paths.items():
        runs = [run_worker("bench.store", ["load", str(path)]) for _ in range(repeats)]
        for load in runs:
            if load["errors"] or load["counts"] != expected:
                raise BenchError(
                    f"{fmt} load: {load['errors']} error(s), counts {load['counts']} "
                    f"!= expected {expected}: {load['first_error']}"
                )
        loads[fmt] = min(runs, key=lambda ld: float(ld["load_s"] + ld["replace_s"]))
        parses[fmt] = run_worker("bench.store", ["parse", str(path)])
    table(
        ("format", "load_file s", "replace s", "total s", "CPU s", "parse CPU*", "translate CPU*"),
        [
            (
                fmt,
                f"{ld['load_s']:.2f}",
                f"{ld['replace_s']:.2f}",
                f"{ld['load_s'] + ld['replace_s']:.2f}",
                f"{ld['cpu_s']:.2f}",
                f"{parses[fmt]['parse_s']:.2f}",
                f"{parses[fmt]['translate_s']:.2f}",
            )
            for fmt, ld in loads.items()
        ],
    )
    print(
        "  total = load_file + Store.replace, wall clock (CPU: the worker's process time).\n"
        "  * load_file's two halves in CPU seconds, timed apart in another run (all documents\n"
        "    parsed first, then translated)."
    )
    table(
        ("format", "RSS before MB", "peak RSS MB", "cache RSS MB", "after malloc_trim MB"),
        [
            (
                fmt,
                f"{ld['rss_before'] / MB:.1f}",
                f"{ld['peak_rss'] / MB:.0f}",
                f"{(ld['rss_gc'] - ld['rss_before']) / MB:.1f}",
                f"{(ld['rss_trim'] - ld['rss_before']) / MB:.1f}",
            )
            for fmt, ld in loads.items()
        ],
    )
    print(
        "  peak = VmHWM during the load; cache = VmRSS once the load is done, its results\n"
        "  dropped and gc.collect() run, minus VmRSS before it (imports done)."
    )
    results = []
    for fmt, ld in loads.items():
        total = ld["load_s"] + ld["replace_s"]
        results.append(at_most(f"load {fmt}", total, "s", LOAD_TARGET_S, judge=judge))
    for fmt, ld in loads.items():
        cache = (ld["rss_gc"] - ld["rss_before"]) / MB
        results.append(at_most(f"cache RSS ({fmt})", cache, "MB", CACHE_TARGET_MB, judge=judge))

    traced = run_worker("bench.store", ["tracemalloc", str(paths["json"])])
    section("store: memory by kind (walking the store after the JSON load)")
    by_kind = loads["json"]["sizes"]
    rows: list[tuple[str, ...]] = []
    for kind, count in expected.items():
        size = by_kind[kind]
        rows.append((kind, f"{count:,}", f"{size / MB:.1f}", f"{size / max(count, 1):,.0f}"))
    for part in ("maps + indexes", "store maps"):
        rows.append((part, "", f"{by_kind[part] / MB:.1f}", ""))
    walked = sum(by_kind.values())
    rows.append(("total", f"{sum(expected.values()):,}", f"{walked / MB:.1f}", ""))
    table(("kind", "records", "MB", "bytes/record"), rows)
    print(
        "  sys.getsizeof of each object reachable from the store, counted once (shared,\n"
        "  interned strings go to the first kind that reaches them).\n"
        f"  tracemalloc: {traced['retained'] / MB:.1f} MB of Python allocations still live after "
        "the JSON load\n  (the cache and what it keeps alive, without allocator slack)."
    )
    results.append(Result("cache tracemalloc (json)", traced["retained"] / MB, "MB"))
    return results


def _report_apply(path: Path, changes: int) -> list[Result]:
    section(f"store: apply ({changes:,} endpoint-slice upserts per batch size, JSON-loaded store)")
    applied = run_worker("bench.store", ["apply", str(path), "--changes", str(changes)])
    rows: list[tuple[str, ...]] = []
    results = []
    for batch in BATCH_SIZES:
        run_ = applied["apply"][str(batch)]
        rate = run_["changes"] / run_["seconds"]
        rows.append(
            (
                f"batch {batch}",
                f"{run_['batches']:,}",
                f"{run_['seconds']:.2f}",
                f"{rate:,.0f}",
                f"{run_['changes'] / run_['cpu_s']:,.0f}",
                f"{1e6 / rate:.1f}",
            )
        )
        name = f"apply rate (batch {batch})"
        if batch == APPLY_TARGET_BATCH:
            results.append(at_least(name, rate, "changes/s", APPLY_TARGET))
        else:
            results.append(Result(name, rate, "changes/s"))
    table(("Store.apply", "batches", "seconds", "changes/s", "per CPU s", "us/change"), rows)
    print("  each change: one EndpointSlice with one endpoint's ready condition flipped")

    section("store: relist (Store.replace of the full set, freshly translated records)")
    rows = []
    for name, label in (("unchanged", "nothing changed"), ("changed", "1% changed")):
        relist = applied["replace"][name]
        rows.append(
            (label, f"{relist['records']:,}", f"{relist['changed']:,}", f"{relist['seconds']:.3f}")
        )
        results.append(Result(f"relist, {label}", relist["seconds"], "s"))
    table(("Store.replace", "records", "changed", "seconds"), rows)
    return results


# -- workers (fresh interpreter each) -------------------------------------------------------


def _load(path: Path) -> tuple[Any, Any, float, float, float]:
    """A Store loaded from ``path``, the LoadResult, load_file and replace seconds, CPU s."""
    from node_services.sources.static import load_file
    from node_services.state.store import Store

    store = Store()
    cpu = time.process_time()
    started = time.perf_counter()
    result = load_file(path, SOURCE)
    loaded = time.perf_counter()
    store.replace(SOURCE, result.records)
    replaced = time.perf_counter()
    return store, result, loaded - started, replaced - loaded, time.process_time() - cpu


def _worker_parse(path: Path) -> dict[str, Any]:
    """Where load_file's time goes, in CPU seconds: the parser alone, then translation."""
    from node_services.sources.static import _documents, _objects, translate_object

    started = time.process_time()
    with path.open("rb") as stream:
        documents = list(_documents(stream))
    parsed = time.process_time()
    records = 0
    for number, document in enumerate(documents, start=1):
        for _, obj in _objects(document, f"document {number}"):
            records += len(translate_object(obj, SOURCE))
    translated = time.process_time()
    return {"parse_s": parsed - started, "translate_s": translated - parsed, "records": records}


def _worker_load(path: Path) -> dict[str, Any]:
    import node_services.sources.static  # noqa: F401  (imports are not the cache)

    gc.collect()
    malloc_trim()
    rss_before = proc_status_bytes("VmRSS")
    reset_peak_rss()
    store, result, load_s, replace_s, cpu_s = _load(path)
    peak_rss = proc_status_bytes("VmHWM")
    errors = list(result.errors)
    del result
    gc.collect()
    rss_gc = proc_status_bytes("VmRSS")
    malloc_trim()
    rss_trim = proc_status_bytes("VmRSS")
    return {
        "load_s": load_s,
        "replace_s": replace_s,
        "cpu_s": cpu_s,
        "rss_before": rss_before,
        "peak_rss": peak_rss,
        "rss_gc": rss_gc,
        "rss_trim": rss_trim,
        "counts": store.snapshot.counts(),
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
        "sizes": _store_sizes(store),
    }


def _worker_tracemalloc(path: Path) -> dict[str, Any]:
    import tracemalloc

    import node_services.sources.static  # noqa: F401

    gc.collect()
    tracemalloc.start()
    baseline = tracemalloc.get_traced_memory()[0]
    store, result, load_s, replace_s, _ = _load(path)
    del result
    gc.collect()
    retained = tracemalloc.get_traced_memory()[0] - baseline
    tracemalloc.stop()
    return {"retained": retained, "load_s": load_s + replace_s, "counts": store.snapshot.counts()}


def _flip(record: Any, j: int) -> Any:
    """The endpoint slice with endpoint ``j``'s ready condition flipped."""
    endpoints = list(record.endpoints)
    endpoints[j] = dataclasses.replace(endpoints[j], ready=not endpoints[j].ready)
    return dataclasses.replace(record, endpoints=tuple(endpoints))


def _worker_apply(path: Path, changes: int) -> dict[str, Any]:
    from node_services.sources.static import load_file
    from node_services.state.records import Endpoints

    store, result, _, _, _ = _load(path)
    current = {r.key: r for r in result.records if isinstance(r, Endpoints)}
    keys = list(current)
    if changes // len(keys) > min(len(r.endpoints) for r in current.values()):
        raise BenchError("more changes than slices x endpoints: a change would repeat")
    out: dict[str, Any] = {"apply": {}, "replace": {}}
    for batch in BATCH_SIZES:
        # Built before timing: a source hands the store ready records.
        upserts = []
        for i in range(changes):
            key = keys[i % len(keys)]
            current[key] = _flip(current[key], (i // len(keys)) % len(current[key].endpoints))
            upserts.append(current[key])
        batches = [upserts[i : i + batch] for i in range(0, changes, batch)]
        version = store.version
        gc.collect()
        cpu = time.process_time()
        started = time.perf_counter()
        for chunk in batches:
            store.apply(SOURCE, chunk)
        seconds = time.perf_counter() - started
        cpu_s = time.process_time() - cpu
        if store.version - version != len(batches):
            raise BenchError(
                f"batch {batch}: {store.version - version} versions, not {len(batches)}"
            )
        if store.snapshot.endpoints[keys[0]] is not current[keys[0]]:
            raise BenchError(f"batch {batch}: the store does not hold the last upsert")
        out["apply"][str(batch)] = {
            "batches": len(batches),
            "changes": changes,
            "seconds": seconds,
            "cpu_s": cpu_s,
        }
        del upserts, batches

    # Relists: the same content translated afresh (new, equal objects), then 1% changed.
    # Start from the file's content again so "unchanged" means unchanged.
    store.replace(SOURCE, result.records)
    for name in ("unchanged", "changed"):
        fresh = list(load_file(path, SOURCE).records)
        changed = 0
        if name == "changed":
            for i in range(0, len(fresh), RELIST_CHANGED_EVERY):
                record = fresh[i]
                if isinstance(record, Endpoints):
                    fresh[i] = _flip(record, 0)
                else:
                    fresh[i] = dataclasses.replace(record, state=record.state + "-changed")
                changed += 1
        version = store.version
        gc.collect()
        started = time.perf_counter()
        store.replace(SOURCE, fresh)
        seconds = time.perf_counter() - started
        if store.version - version != (1 if changed else 0):
            raise BenchError(f"relist {name}: version moved by {store.version - version}")
        out["replace"][name] = {"records": len(fresh), "changed": changed, "seconds": seconds}
        del fresh
    return out


def _store_sizes(store: Any) -> dict[str, int]:
    """Bytes reachable from the store, by kind of record, then indexes, then the store's maps.

    Each object counts once, for the first part that reaches it (interned strings shared by
    many records count once, for the first kind)."""
    snapshot = store.snapshot
    seen: set[int] = set()
    sizes: dict[str, int] = {}
    for kind, field in (
        ("host", "hosts"),
        ("stack", "stacks"),
        ("workload", "workloads"),
        ("service", "services"),
        ("endpoints", "endpoints"),
    ):
        frozen = getattr(snapshot, field)
        sizes[kind] = _walk(list(frozen.values()), seen)
    indexes = [getattr(snapshot, f) for f in ("by_ip", "by_host", "by_name", "endpoints_of")]
    sizes["maps + indexes"] = _walk(indexes, seen) + _walk(
        [getattr(snapshot, f) for f in ("hosts", "stacks", "workloads", "services", "endpoints")],
        seen,
    )
    sizes["store maps"] = _walk(store._by_source, seen)
    return sizes


def _walk(root: Any, seen: set[int]) -> int:
    """sys.getsizeof of every object reachable from ``root`` not yet in ``seen``."""
    from node_services.state.frozenmap import FrozenMap

    total = 0
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        if isinstance(obj, str | int | float | bool | bytes) or obj is None:
            continue
        if isinstance(obj, tuple | list | set | frozenset):
            stack.extend(obj)
        elif isinstance(obj, dict):
            stack.extend(obj)
            stack.extend(obj.values())
        elif isinstance(obj, FrozenMap):
            stack.extend(obj._shards)
        elif dataclasses.is_dataclass(obj):
            stack.extend(getattr(obj, f.name) for f in dataclasses.fields(obj))
    return total


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.store", description=__doc__)
    parser.add_argument("mode", choices=("report", "load", "parse", "tracemalloc", "apply"))
    parser.add_argument("path", nargs="?", type=Path)
    parser.add_argument("--changes", type=int, default=CHANGES_FULL)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.mode == "report":
        run(args.quick)
        return 0
    if args.path is None:
        parser.error(f"{args.mode} needs a snapshot path")
    if args.mode == "load":
        out = _worker_load(args.path)
    elif args.mode == "parse":
        out = _worker_parse(args.path)
    elif args.mode == "tracemalloc":
        out = _worker_tracemalloc(args.path)
    else:
        out = _worker_apply(args.path, args.changes)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
