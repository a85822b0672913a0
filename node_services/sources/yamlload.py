"""A faster ``yaml.load_all(stream, Loader=CSafeLoader)`` with exactly the same results.

libyaml parses and composes the node graph in C either way; what costs is Python: the
resolver (a dozen regexes tried on every plain scalar) and ``SafeConstructor`` (a generator
per container, state lists, flatten_mapping). :class:`FastSafeLoader` keeps both behaviours
and makes them cheap:

- ``resolve`` answers ``str`` at once for quoted scalars and for plain scalars whose first
  character starts none of SafeLoader's implicit resolvers (most of a kubectl dump); other
  plain scalars go through SafeLoader's own resolver, memoised by value (it depends on the
  value alone).
- ``construct_document`` walks the node tree directly for the plain cases: mappings (``map``
  tag), sequences (``seq``), scalars constructed by SafeConstructor's own scalar
  constructors (``str`` is the value itself). A document with anything else (an alias or an
  anchor used twice, a merge key ``<<`` or ``=`` key, a non-scalar key, a tag other than
  the plain ones) is built by ``SafeConstructor`` unchanged instead.

Limits (hostile input; a refused document raises :class:`InputLimitError` naming its line):

- nesting: at most :data:`MAX_DEPTH` levels of mappings/sequences (checked as the fast path
  builds, and on the node graph before ``SafeConstructor`` builds a document);
- aliases (``*name`` and ``<<: *name``): at most :data:`MAX_ALIASES` uses of mappings and
  sequences per document, and
  expanding them all may add at most :data:`MAX_ALIAS_EXPANSION` nodes (a "billion laughs"
  file of 31 KB would add 10^9); an alias inside its own anchor (a recursive document) is
  refused. A document without aliases is never walked twice, so these checks cost the fast
  path only its depth count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import IO, Any, Final

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from node_services.sources.errors import InputLimitError

MAX_DEPTH: Final = 100
"""Deepest nesting of mappings and sequences a document may have (kubectl output: ~20)."""
MAX_ALIASES: Final = 10_000
"""Most alias uses of mappings and sequences (``*name``, merge keys included) one document may
make; aliases of scalars share one immutable value and are not counted."""
MAX_ALIAS_EXPANSION: Final = 100_000
"""Most nodes expanding every alias of one document may add to it."""

_STR = "tag:yaml.org,2002:str"
_SEQ = "tag:yaml.org,2002:seq"
_MAP = "tag:yaml.org,2002:map"

_Base: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Fallback(Exception):
    """The document needs SafeConstructor's full machinery."""


# At most this many plain scalars' tags are remembered (a few MB); then it starts over.
_RESOLVED_MAX = 1 << 14

# Tags whose scalar values are memoised: their constructors return immutable values that
# depend on the scalar text alone.
_MEMO_TAGS = (
    "tag:yaml.org,2002:null",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
)
# Scalar tags built by calling SafeConstructor's own (non-generator) constructor.
_SCALAR_TAGS = (*_MEMO_TAGS, "tag:yaml.org,2002:binary", "tag:yaml.org,2002:timestamp")


class FastSafeLoader(_Base):  # type: ignore[misc]
    """``CSafeLoader`` (``SafeLoader`` without libyaml) with a cheap resolver and builder."""

    # The shortcuts below hold for SafeLoader's resolver table: no wildcard implicit
    # resolvers, no path resolvers (which would make a node's tag depend on its position).
    _shortcuts = None not in _Base.yaml_implicit_resolvers and not _Base.yaml_path_resolvers
    if _shortcuts:
        # Without path resolvers these track nothing: a C-level no-op is cheaper than
        # BaseResolver's Python methods, called once per node.
        descend_resolver: Any = {}.get  # (parent, index) -> ignored
        ascend_resolver: Any = tuple  # () -> ignored

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        if self._shortcuts:
            self.resolve = _resolver(super().resolve)
        self._memo: dict[str, dict[str, Any]] = {tag: {} for tag in _MEMO_TAGS}
        self._scalars: dict[str, Callable[[Any, Node], Any]] = {
            tag: self.yaml_constructors[tag]
            for tag in _SCALAR_TAGS
            if tag in self.yaml_constructors
        }
        self._seen: set[int] = set()
        # The walk is SafeConstructor's str/map/seq: a subclass that replaced them gets its own.
        safe = yaml.constructor.SafeConstructor
        self._plain = all(
            self.yaml_constructors.get(tag) is safe.yaml_constructors[tag]
            for tag in (_STR, _MAP, _SEQ)
        )

    def construct_document(self, node: Node) -> Any:
        if not self._plain:  # str/map/seq constructors customised (in a subclass)
            return super().construct_document(node)
        self._seen = set()
        try:
            return self._build(node, 1)
        except InputLimitError:
            raise
        except Exception:
            # _Fallback, RecursionError, or a bad scalar (!!int x): SafeConstructor builds
            # the document again, in its own order, so the result or the error is its own.
            pass
        finally:
            self._seen = set()
        check_limits(node)
        return super().construct_document(node)

    def _scalar(self, node: Node) -> Any:
        tag = node.tag
        if tag == _STR:
            return node.value
        memo = self._memo.get(tag)
        if memo is not None:
            value = memo.get(node.value, memo)
            if value is memo:
                if len(memo) >= _RESOLVED_MAX:
                    memo.clear()
                value = memo[node.value] = self._scalars[tag](self, node)
            return value
        constructor = self._scalars.get(tag)
        if constructor is None:
            raise _Fallback
        return constructor(self, node)

    def _build(self, node: Node, depth: int) -> Any:
        cls = node.__class__
        if cls is ScalarNode:
            return self._scalar(node)
        if depth > MAX_DEPTH:
            raise _too_deep(node)
        seen = self._seen
        if id(node) in seen:  # an alias: SafeConstructor shares (and may recurse into) it
            raise _Fallback
        seen.add(id(node))
        if cls is MappingNode:
            if node.tag != _MAP:
                raise _Fallback
            data: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                if key_node.__class__ is not ScalarNode:
                    raise _Fallback  # unhashable keys are SafeConstructor's error to raise
                key = key_node.value if key_node.tag == _STR else self._scalar(key_node)
                if value_node.__class__ is ScalarNode:
                    if value_node.tag == _STR:
                        data[key] = value_node.value
                    else:
                        data[key] = self._scalar(value_node)
                else:
                    data[key] = self._build(value_node, depth + 1)
            return data
        if cls is SequenceNode:
            if node.tag != _SEQ:
                raise _Fallback
            items: list[Any] = []
            append = items.append
            for item in node.value:
                if item.__class__ is ScalarNode and item.tag == _STR:
                    append(item.value)
                else:
                    append(self._build(item, depth + 1))
            return items
        raise _Fallback  # pragma: no cover - composers make only these three node kinds


def _line(node: Node) -> str:
    mark = node.start_mark
    return f"line {mark.line + 1}" if mark is not None else "somewhere"


def _too_deep(node: Node) -> InputLimitError:
    return InputLimitError(f"nested more than {MAX_DEPTH} levels deep (at {_line(node)})")


def check_limits(root: Node) -> None:
    """Raise :class:`InputLimitError` if the document under ``root`` nests deeper than
    :data:`MAX_DEPTH`, uses more than :data:`MAX_ALIASES` aliases, would grow by more than
    :data:`MAX_ALIAS_EXPANSION` nodes with its aliases expanded, or contains itself.

    One walk of the node graph (shared nodes are aliases), iterative: the sizes and heights
    of shared nodes are computed once, so a billion-laughs graph costs its own size."""
    size: dict[int, int] = {}  # id(node) -> nodes in it, aliases expanded
    height: dict[int, int] = {}  # id(node) -> nesting levels in it, aliases expanded
    open_: set[int] = set()  # nodes whose children are being walked: the current path
    distinct = 0
    aliases = 0
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        nid = id(node)
        value = node.value
        if node.__class__ is ScalarNode:  # an alias of one shares one str/int: not counted
            if nid not in size:
                distinct += 1
                size[nid], height[nid] = 1, 0
            continue
        children: list[Node] = (
            [part for pair in value for part in pair] if node.__class__ is MappingNode else value
        )
        if children_done:
            open_.discard(nid)
            size[nid] = 1 + sum(size[id(child)] for child in children)
            level = 1 + max((height[id(child)] for child in children), default=0)
            height[nid] = level
            if level > MAX_DEPTH:
                raise _too_deep(node)
            if size[nid] - distinct > MAX_ALIAS_EXPANSION:
                raise InputLimitError(
                    f"its aliases would expand it by more than {MAX_ALIAS_EXPANSION:,} nodes "
                    f"(at {_line(node)}; an alias bomb?)"
                )
            continue
        if nid in size:
            aliases += 1
            if aliases > MAX_ALIASES:
                raise InputLimitError(f"more than {MAX_ALIASES:,} alias uses (at {_line(node)})")
            continue
        if nid in open_:
            raise InputLimitError(f"an alias refers to a node that contains it (at {_line(node)})")
        if len(open_) >= MAX_DEPTH:
            raise _too_deep(node)
        distinct += 1
        open_.add(nid)
        stack.append((node, True))
        stack.extend((child, False) for child in children)


def _resolver(resolve: Callable[[Any, Any, Any], str]) -> Callable[[Any, Any, Any], str]:
    """``resolve`` (SafeLoader's) made cheap: quoted scalars are str, plain scalars whose first
    character starts no implicit resolver are str, the rest are resolved once per value."""
    starts = frozenset(k for k in _Base.yaml_implicit_resolvers if k)
    tags: dict[str, str] = {}

    def fast_resolve(kind: Any, value: Any, implicit: Any) -> str:
        if kind is ScalarNode:
            if implicit[0] and (not value or value[0] in starts):
                tag = tags.get(value)
                if tag is None:
                    if len(tags) >= _RESOLVED_MAX:  # unique values (IPs, uids): bound it
                        tags.clear()
                    tag = tags[value] = resolve(kind, value, implicit)
                return tag
            return _STR
        return _MAP if kind is MappingNode else _SEQ

    return fast_resolve


def load_all(stream: IO[bytes] | IO[str] | bytes | str) -> Iterator[Any]:
    """The documents of ``stream``, as ``yaml.load_all(stream, Loader=CSafeLoader)``."""
    return yaml.load_all(stream, Loader=FastSafeLoader)
