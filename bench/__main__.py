"""`python -m bench [--quick]`: run every benchmark module of this package in turn."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import bench


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    status = 0
    for module in sorted(m.name for m in pkgutil.iter_modules(bench.__path__)):
        if module.startswith("_"):
            continue
        print(f"== bench.{module}", flush=True)
        status |= importlib.import_module(f"bench.{module}").main(list(argv))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
