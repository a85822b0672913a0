"""`make bench`: run every benchmark module of this package (``bench/<name>.py``)."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    status = 0
    for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if module.name.startswith("_"):
            continue
        print(f"== bench.{module.name}", flush=True)
        status |= importlib.import_module(f"bench.{module.name}").main(argv)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
