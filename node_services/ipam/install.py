"""``node-services-ipam --install DIR``: put the CNI plugin where a container runtime runs it.

The runtime starts the plugin once per pod command, so what it runs is a launcher that starts
the interpreter with ``-S`` (no site-packages scan) and imports the plugin from a known
directory, and the plugin's bytecode is written now (a runtime with PYTHONDONTWRITEBYTECODE
would otherwise compile it on every pod start).

The plugin is standard library only, so a host can run it on its own Python (3.11 or later)
even when node-services itself runs in a container the host cannot reach into:

- ``--python PATH``: the interpreter the launcher names (default: this one);
- ``--lib DIR``: copy the plugin's modules into DIR and import them from there (default: import
  them from where this package is installed);
- ``--root DIR``: write every file under DIR while the launcher names the paths without it
  (a DaemonSet's init container with the host's directories mounted under /host).

Bytecode is written only when the launcher's interpreter is this one and ``--root`` is unset:
another interpreter keeps its own bytecode.
"""

from __future__ import annotations

import argparse
import os
import py_compile
import shutil
import sys

PLUGIN_NAME = "node-services-ipam"

PLUGIN_MODULES = (
    "node_services/__init__.py",
    "node_services/ipam/__init__.py",
    "node_services/ipam/cni.py",
    "node_services/ipam/cnijson.py",
    "node_services/ipam/allocator.py",
    "node_services/ipam/store.py",
    "node_services/ipam/tables.py",
)
"""Every project module a plugin command loads (a test checks it against an ADD's imports)."""

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_LAUNCHER = """#!{python} -S
# {name}: CNI IPAM plugin launcher (written by {name} --install)
import sys
if sys.version_info < (3, 11):
    sys.stdout.write(
        '{{"cniVersion": "1.1.0", "code": 110, "msg": "{name} needs Python 3.11 or later", '
        '"details": "%s at %s"}}\\n' % (sys.version.split()[0], sys.executable)
    )
    sys.exit(1)
sys.path.insert(0, {package_root!r})
from node_services.ipam.cni import main
sys.exit(main())
"""


def install(
    directory: str, *, python: str = sys.executable, lib: str | None = None, root: str = ""
) -> str:
    """Write the launcher ``DIR/node-services-ipam`` (and the modules into ``lib``); returns
    the launcher's path as the runtime sees it (without ``root``)."""
    package_root = _PACKAGE_ROOT
    if lib is not None:
        package_root = lib
        for module in PLUGIN_MODULES:
            _copy(os.path.join(_PACKAGE_ROOT, module), _rooted(root, os.path.join(lib, module)))
    launcher = _LAUNCHER.format(python=python, name=PLUGIN_NAME, package_root=package_root)
    target = os.path.join(directory, PLUGIN_NAME)
    _write(_rooted(root, target), launcher.encode(), 0o755)
    if not root and os.path.realpath(python) == os.path.realpath(sys.executable):
        for module in PLUGIN_MODULES:
            _precompile(os.path.join(package_root, module))
    return target


def _rooted(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/")) if root else path


def _copy(source: str, target: str) -> None:
    with open(source, "rb") as file:
        _write(target, file.read(), 0o644)
    shutil.copystat(source, target)  # the source's mtime: bytecode made from it stays valid


def _write(target: str, data: bytes, mode: int) -> None:
    """Replace ``target`` at once: a runtime never runs a half-written launcher."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    temporary = f"{target}.{os.getpid()}.tmp"
    with open(temporary, "wb") as file:
        file.write(data)
    os.chmod(temporary, mode)
    os.replace(temporary, target)


def _precompile(path: str) -> None:
    try:
        py_compile.compile(path, doraise=True)
    except (OSError, py_compile.PyCompileError) as exc:  # read-only install: still works
        sys.stderr.write(f"{PLUGIN_NAME}: could not precompile {path}: {exc}\n")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=f"{PLUGIN_NAME} --install",
        description="Write the CNI plugin's launcher into DIR (a runtime's CNI_PATH directory).",
    )
    parser.add_argument("directory", metavar="DIR", help="where the runtime looks for plugins")
    parser.add_argument(
        "--python",
        default=sys.executable,
        metavar="PATH",
        help="the interpreter the launcher runs (Python 3.11+; default: this one)",
    )
    parser.add_argument(
        "--lib",
        metavar="DIR",
        help="copy the plugin's modules into DIR and run them from there",
    )
    parser.add_argument(
        "--root",
        default="",
        metavar="DIR",
        help="write every file under DIR; the launcher names the paths without it",
    )
    args = parser.parse_args(argv)
    for name in ("directory", "lib"):
        value = getattr(args, name)
        if value is not None and not os.path.isabs(value):
            parser.error(f"{name.replace('directory', 'DIR')} must be an absolute path: {value}")
    try:
        print(install(args.directory, python=args.python, lib=args.lib, root=args.root))
    except OSError as exc:
        sys.stderr.write(f"{PLUGIN_NAME} --install: {exc}\n")
        return 1
    return 0
