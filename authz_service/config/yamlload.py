"""YAML from people and from the network, read strictly: the config file, API bodies, `apply -f`.

PyYAML's `safe_load` already refuses tags that build Python objects (`!!python/object`), but it
accepts three things a config must not have:
- a key twice in one mapping (the last one silently wins: Aidbox's own docs have an example with
  `id` twice, and the reader cannot tell which one the author meant);
- aliases that expand to far more than the text (the "billion laughs": nine anchors of ten aliases
  each are 10^9 nodes to anything that walks the result, such as `${VAR}` expansion);
- an alias inside the node it names (`&a [*a]`), which no walk of the result terminates on.
So the document is composed first (libyaml when available), its node graph checked for those
without expanding it, and only then constructed by the safe constructor.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MERGE_TAG = "tag:yaml.org,2002:merge"

MAX_ALIAS_NODES = 100_000
"""Nodes aliases may add to a document beyond its own (a legitimate anchor adds a few hundred)."""
MAX_DEPTH = 64
"""Nesting levels, counted through aliases (a config's deepest part, a json-schema policy, uses ~20)."""


class YamlError(ValueError):
    """Text that is not acceptable YAML. `syntax` is True for text that is not YAML at all (a 400
    through the API), False for YAML with content we refuse (duplicate keys, tags, alias bombs: 422)."""

    def __init__(self, message: str, *, syntax: bool) -> None:
        self.message = message
        self.syntax = syntax
        super().__init__(message)


def load(text: str) -> Any:
    """The one document in `text` (None when empty), or YamlError."""
    loader = _Loader(text)
    try:
        try:
            node = loader.get_single_node()
        except yaml.MarkedYAMLError as err:
            raise _syntax_error(err) from None
        except yaml.YAMLError as err:  # e.g. "expected a single document in the stream"
            raise YamlError(f"is not valid YAML ({_first_line(err)})", syntax=True) from None
        return None if node is None else _construct(loader, node)
    finally:
        loader.dispose()


def load_all(text: str) -> list[Any]:
    """Every document of a YAML stream (`---` separated), or YamlError."""
    loader = _Loader(text)
    documents: list[Any] = []
    try:
        while True:
            try:
                if not loader.check_node():
                    return documents
                node = loader.get_node()
            except yaml.MarkedYAMLError as err:
                raise _syntax_error(err) from None
            documents.append(None if node is None else _construct(loader, node))
    finally:
        loader.dispose()


def _construct(loader: yaml.SafeLoader, node: Node) -> Any:
    _check_graph(loader, node)
    try:
        return loader.construct_document(node)
    except yaml.constructor.ConstructorError as err:
        # Unknown or unsafe tags (!!python/object/apply:...), unhashable keys, bad !!binary, ...
        raise YamlError(f"{_first_line(err)}{_where(err.problem_mark)}", syntax=False) from None
    except (ValueError, TypeError, OverflowError) as err:  # e.g. a timestamp out of range
        raise YamlError(
            f"has a value that cannot be read ({type(err).__name__}){_where(node.start_mark)}", syntax=False
        ) from None


def _check_graph(loader: yaml.SafeLoader, root: Node) -> None:
    """Duplicate keys, self-containing aliases, alias expansion and depth, without expanding anything."""
    size: dict[int, int] = {}  # node id -> nodes it stands for, aliases expanded
    depth: dict[int, int] = {}
    in_progress: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            children = _children(node)
            size[key] = 1 + sum(size[id(c)] for c in children)
            depth[key] = 1 + max((depth[id(c)] for c in children), default=0)
            in_progress.discard(key)
            if depth[key] > MAX_DEPTH:
                raise YamlError(f"is nested deeper than {MAX_DEPTH} levels{_where(node.start_mark)}", syntax=False)
            continue
        if key in size:
            continue  # an alias of a node already checked: its size is known
        if key in in_progress:
            raise YamlError(f"has an alias inside the node it refers to{_where(node.start_mark)}", syntax=False)
        in_progress.add(key)
        if isinstance(node, MappingNode):
            _check_keys(loader, node)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node))
    distinct = len(size)
    if size[id(root)] - distinct > MAX_ALIAS_NODES:
        raise YamlError(
            f"has aliases that expand to more than {MAX_ALIAS_NODES} extra nodes (an alias bomb?)", syntax=False
        )


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_keys(loader: yaml.SafeLoader, node: MappingNode) -> None:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, ScalarNode) or key_node.tag == _MERGE_TAG:
            continue  # a merge (`<<: *base`) may override on purpose; other non-scalar keys fail later
        try:
            key = loader.construct_object(key_node)
        except yaml.constructor.ConstructorError as err:
            raise YamlError(f"{_first_line(err)}{_where(key_node.start_mark)}", syntax=False) from None
        except (ValueError, TypeError, OverflowError):
            continue  # reported, with its place, when the document is constructed
        line = key_node.start_mark.line + 1
        try:
            first = seen.get(key)
        except TypeError:
            continue  # unhashable: the constructor reports it
        if first is not None:
            shown = repr(key) if not isinstance(key, str) or len(key) <= 64 else repr(key[:64] + "...")
            raise YamlError(
                f"has the key {shown} twice in one mapping (line {first} and line {line}); keep one", syntax=False
            )
        seen[key] = line


def _syntax_error(err: yaml.MarkedYAMLError) -> YamlError:
    mark = err.problem_mark or err.context_mark
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    said = ", ".join(part for part in (err.context, err.problem) if part)
    problem = f": {said}" if said else ""
    return YamlError(f"is not valid YAML{where}{problem}", syntax=True)


def _where(mark: Any) -> str:
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def _first_line(err: yaml.YAMLError) -> str:
    problem = getattr(err, "problem", None)
    text = problem if isinstance(problem, str) and problem else str(err)
    return text.splitlines()[0][:200] if text else type(err).__name__
