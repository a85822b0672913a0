"""JSON for the CNI plugin process without importing :mod:`json`.

``import json`` pulls in :mod:`re` and :mod:`enum`, which cost the plugin about 5 ms of its
~20 ms start-up (measured: ``python -S -c 'import json'`` 16 ms against 8 ms for ``pass``),
and the plugin starts once per pod command. CPython's ``_json`` accelerator, which
:mod:`json` itself drives, is a plain C extension: :func:`loads` and :func:`dumps` call it
directly with the settings ``json.loads`` / ``json.dumps`` use by default, so the results are
the same. Anything unusual (no ``_json``, bytes that are not plain UTF-8, malformed input)
goes to :mod:`json` itself, which then gives its usual result or its exact error.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs the plugin's start-up an import
    from typing import Any

_accel: Any
try:
    import _json

    _accel = _json
except ImportError:  # another Python implementation: the json module does it all
    _accel = None

_WHITESPACE = " \t\n\r"


class NestingError(ValueError):
    """The document nests arrays/objects deeper than the decoder's recursion limit allows."""


class _DecodeContext:
    """What ``_json.make_scanner`` reads from a ``json.JSONDecoder`` (its defaults)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float  # NaN, Infinity, -Infinity, as json.loads reads them


def loads(data: bytes | str) -> Any:
    """``json.loads(data)``; a document nested too deeply for the decoder (about 1000 levels,
    the interpreter's recursion limit) raises :class:`NestingError`, a ValueError, instead of
    RecursionError, so every undecodable input is one kind of error to the caller."""
    try:
        return _loads(data)
    except RecursionError:
        raise NestingError("JSON nested too deeply (arrays or objects ~1000 levels deep)") from None


def _loads(data: bytes | str) -> Any:
    if _accel is None:
        return _slow_loads(data)
    if isinstance(data, bytes):
        if data[:3] == b"\xef\xbb\xbf" or b"\x00" in data[:4]:
            return _slow_loads(data)  # a BOM or UTF-16/32: json.loads detects the encoding
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return _slow_loads(data)  # raises the same error json.loads would
    else:
        text = data
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        value, end = _accel.make_scanner(_DecodeContext)(text, start)
    except RecursionError:
        raise
    except Exception:
        # (StopIteration, or the accelerator's own errors, which need json.decoder loaded:
        # without it they come out as SystemError)
        return _slow_loads(data)
    if text[end:].strip(_WHITESPACE):
        return _slow_loads(data)  # "Extra data"
    return value


def dumps(value: Any) -> str:
    """``json.dumps(value)`` for the plain dicts, lists, strings and numbers the plugin writes."""
    if _accel is None:
        import json

        return json.dumps(value)
    encode = _accel.make_encoder(
        {}, _not_serializable, _accel.encode_basestring_ascii, None, ": ", ", ", False, False, True
    )
    return "".join(encode(value, 0))


def _not_serializable(value: object) -> object:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _slow_loads(data: bytes | str) -> Any:
    import json

    return json.loads(data)


BRIEF_LIMIT = 120


def brief(value: Any) -> str:
    """``repr(value)`` for an error message, at most about :data:`BRIEF_LIMIT` characters: a
    decoded value can be megabytes long or nested hundreds deep (where repr itself fails)."""
    if isinstance(value, dict | list) and len(value) > BRIEF_LIMIT:
        return f"a {type(value).__name__} of {len(value)} items"
    try:
        text = repr(value)
    except RecursionError:
        return f"a deeply nested {type(value).__name__}"
    return text if len(text) <= BRIEF_LIMIT else text[: BRIEF_LIMIT - 3] + "..."
