"""Run every benchmark module of this package (``main(argv)`` each), passing the arguments on."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    status = 0
    for module in sorted(pkgutil.iter_modules([str(Path(__file__).parent)])):
        if module.name.startswith("_"):
            continue
        bench = importlib.import_module(f"bench.{module.name}")
        run = getattr(bench, "main", None)
        if callable(run):
            print(f"== bench.{module.name}", flush=True)
            status |= int(run(list(argv)) or 0)
    return status


if __name__ == "__main__":
    sys.exit(main())
