"""Reading ``castiron.yaml``: bytes → YAML node tree → plain values → validated :class:`Spec`.

Owns everything between the file and the schema: size and encoding limits, YAML parsing with
marks, refusing what YAML allows but a spec must not contain (duplicate keys, custom tags,
non-string keys, several documents, alias bombs), ``x-`` extension keys, ``${VAR}`` and
``${tf:NAME}`` interpolation (outputs of the file named in ``terraform.outputs``), and turning
validation errors into :class:`~castiron.errors.SpecIssue` lines (``FILE:LINE:COL:
dotted.path: message``) that point at the offending node. Every problem found is reported at
once.

It must not know the CLI (no click, no rich), any runtime, or the process environment: the
variables used for interpolation are passed in by the caller. pydantic (and the schema) are
imported only when a spec is validated, so :func:`read_spec` (parse and interpolate, no
validation) stays cheap for callers that cache validation results.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

from castiron.errors import SpecError, SpecIssue
from castiron.model import sha256_digest

if TYPE_CHECKING:  # validation imports pydantic on use
    from pydantic import BaseModel, ValidationError

    from castiron.spec.schema import Spec
    from castiron.spec.tfoutputs import TfOutput

MAX_BYTES = 1024 * 1024
"""Largest spec file read, in bytes."""

MAX_NODES = 100_000
"""Most YAML nodes built after expanding aliases (a guard against alias bombs)."""

MAX_DEPTH = 64
"""Deepest nesting of mappings and sequences."""

_TAG = "tag:yaml.org,2002:"
_PathPart = str | int
_Path = tuple[_PathPart, ...]
_Pos = tuple[int, int]

# Maps under these paths hold environment variable values: their scalars keep the text as
# written (`VERSION: 1.10` stays "1.10", `DEBUG: yes` stays "yes").
_RAW_VALUE_MAPS: tuple[tuple[str | None, ...], ...] = (
    ("image", "env"),
    ("image", "labels"),
    ("service", "env"),
    ("environments", None, "env"),
)

# `${...}` under these paths is resolved at deploy time, not when loading: secrets are
# references, and policy checks see the URL of the new instances.
_DEPLOY_TIME: tuple[tuple[str | None, ...], ...] = (
    ("service", "secrets"),
    ("environments", None, "policy", "checks"),
)


@dataclass(frozen=True)
class LoadedSpec:
    """A validated spec and where it came from."""

    spec: Spec
    """The validated spec."""
    path: Path
    """Absolute path of the spec file."""
    digest: str
    """``sha256:<hex>`` of the file's raw bytes."""

    @property
    def base_dir(self) -> Path:
        """The spec file's directory; relative paths in the spec are relative to it."""
        return self.path.parent


@dataclass(frozen=True)
class ReadSpec:
    """A spec file parsed and interpolated but not validated (see :func:`read_spec`)."""

    path: Path
    """Absolute path of the spec file."""
    digest: str
    """``sha256:<hex>`` of the file's raw bytes."""
    value: dict[str, Any]
    """The plain values, with ``x-`` keys under ``extensions`` as validation sees them."""
    clean: bool
    """False when reading found problems (:func:`load_spec` reports them all)."""

    def env_maps(self) -> list[tuple[tuple[str, ...], dict[str, Any]]]:
        """The environment-variable maps of the values (``image.env``, ``image.labels``,
        ``service.env``, ``environments.<name>.env``) with their paths; their values are kept
        as text, never typed, so any text there validates alike."""
        found: list[tuple[tuple[str, ...], dict[str, Any]]] = []

        def walk(node: object, path: tuple[str, ...]) -> None:
            if not isinstance(node, dict):
                return
            if _is_raw_map(path) and path:
                found.append((path, node))
                return
            for key, child in node.items():
                if key != "extensions" or path:
                    walk(child, (*path, key))

        walk(self.value, ())
        return found


def read_spec(path: Path, environ: Mapping[str, str]) -> ReadSpec:
    """Read, parse and interpolate the spec file at ``path`` without validating it (no
    pydantic): what a cache of validation results keys on.

    Raises:
        SpecError: when the file cannot be read or is not a YAML mapping.
    """
    path = Path(path).absolute()
    data = _read(path)
    value, issues = _values(_decode(data, _display_name(path)), _display_name(path), environ)
    return ReadSpec(path=path, digest=sha256_digest(data), value=value, clean=not issues)


def _read(path: Path) -> bytes:
    name = _display_name(path)
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise SpecError([SpecIssue(name, 1, 1, "", "no such file")]) from None
    except IsADirectoryError:
        raise SpecError([SpecIssue(name, 1, 1, "", "is a directory, not a file")]) from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise SpecError([SpecIssue(name, 1, 1, "", f"cannot read the file: {reason}")]) from None
    return data


def load_spec(path: Path, environ: Mapping[str, str]) -> LoadedSpec:
    """Read, parse and validate the spec file at ``path``.

    ``environ`` supplies the values of ``${VAR}`` references.

    Raises:
        SpecError: when the file is missing, unreadable, too large, not UTF-8, not valid YAML,
            or does not validate; it carries every issue found.
    """
    path = Path(path).absolute()
    data = _read(path)
    spec = load_spec_text(data, _display_name(path), environ)
    return LoadedSpec(spec=spec, path=path, digest=sha256_digest(data))


def issue_locator(
    path: Path, environ: Mapping[str, str]
) -> Callable[[tuple[str | int, ...], str], SpecIssue]:
    """A maker of issues located in the spec file at ``path`` (``FILE:LINE:COL: dotted.path:
    message``), for problems found after validation (a missing context, an unreadable secret
    file).

    Raises:
        SpecError: when the file cannot be read or parsed.
    """
    path = Path(path).absolute()
    name = _display_name(path)
    _, builder = _build(_decode(_read(path), name), name, environ)

    def at(where: tuple[str | int, ...], message: str) -> SpecIssue:
        line, column = builder.position(where)
        return SpecIssue(name, line, column, _dotted(where), message)

    return at


def load_spec_text(data: bytes | str, filename: str, environ: Mapping[str, str]) -> Spec:
    """Parse and validate spec text; ``filename`` names it in messages.

    Raises:
        SpecError: with every issue found, each located as ``filename:LINE:COL``.
    """
    from pydantic import ValidationError

    from castiron.spec.schema import Spec

    value, builder = _build(_decode(data, filename), filename, environ)
    issues = list(builder.issues)
    extensions = value.pop("extensions")
    spec: Spec | None = None
    try:
        spec = Spec.model_validate({**value, "extensions": extensions})
    except ValidationError as exc:
        issues.extend(_translate(exc, value, builder))
    if issues or spec is None:
        issues.sort(key=lambda i: (i.line, i.column, i.path))
        raise SpecError(_dedupe(issues))
    return spec


def _build(text: str, filename: str, environ: Mapping[str, str]) -> tuple[dict[str, Any], _Builder]:
    """Plain values (``x-`` keys under ``extensions``) and the builder that saw the problems.

    Raises:
        SpecError: when the text is not a YAML mapping, or building had to stop.
    """
    root = _compose(text, filename)
    builder = _Builder(filename, environ)
    try:
        value = builder.build_root(root)
    except _Abort as abort:
        raise SpecError([abort.issue]) from None
    if "extensions" in value:
        builder.issues.append(builder.unknown_key_issue(("extensions",), "Spec"))
        builder.poisoned.add(("extensions",))
        del value["extensions"]
    value["extensions"] = builder.extensions
    return value, builder


def _values(
    text: str, filename: str, environ: Mapping[str, str]
) -> tuple[dict[str, Any], list[SpecIssue]]:
    value, builder = _build(text, filename, environ)
    return value, builder.issues


# --- bytes and text -------------------------------------------------------------------------


def _display_name(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except (ValueError, OSError):
        return str(path)


def _decode(data: bytes | str, filename: str) -> str:
    size = len(data.encode("utf-8", "surrogatepass")) if isinstance(data, str) else len(data)
    if size > MAX_BYTES:
        raise SpecError(
            [SpecIssue(filename, 1, 1, "", f"the file is larger than {MAX_BYTES} bytes (1 MiB)")]
        )
    if isinstance(data, str):
        text = data
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            offset = exc.start
            line = data.count(b"\n", 0, offset) + 1
            column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
            message = f"not valid UTF-8: byte 0x{data[offset]:02x} at offset {offset}"
            raise SpecError([SpecIssue(filename, line, column, "", message)]) from None
    if not text.strip():
        raise SpecError([SpecIssue(filename, 1, 1, "", "the file is empty")])
    return text


# --- YAML → node tree ---------------------------------------------------------------------------


class _TooDeep(Exception):
    def __init__(self, mark: yaml.Mark | None) -> None:
        super().__init__("too deep")
        self.mark = mark


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, used only to compose nodes, with a nesting limit."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _TooDeep(self.peek_event().start_mark)  # type: ignore[no-untyped-call]
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _compose(text: str, filename: str) -> MappingNode:
    try:
        loader = _Loader(text)
        try:
            if not loader.check_node():
                raise SpecError([SpecIssue(filename, 1, 1, "", "the file is empty")])
            root = loader.get_node()
            if root is None:
                raise SpecError([SpecIssue(filename, 1, 1, "", "the file is empty")])
            if loader.check_node():
                mark = loader.peek_event().start_mark  # type: ignore[no-untyped-call]
                line, column = _pos(mark)
                message = "only one YAML document is allowed; found a second one"
                raise SpecError([SpecIssue(filename, line, column, "", message)])
        finally:
            loader.dispose()
    except _TooDeep as exc:
        line, column = _pos(exc.mark)
        message = f"nested too deeply (more than {MAX_DEPTH} levels)"
        raise SpecError([SpecIssue(filename, line, column, "", message)]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, column = _pos(mark)
        problem = exc.problem or "invalid YAML"
        context = f" ({exc.context})" if exc.context else ""
        message = f"invalid YAML: {problem}{context}"
        if "flow" in (exc.context or "") and "${" in text:
            message += "; quote values that contain ${...} inside [...] or {...}"
        anchor = re.search(r"found duplicate anchor ('[^']*')", exc.context or "")
        if anchor and exc.context_mark is not None:
            first_line, first_column = _pos(exc.context_mark)
            message = (
                f"duplicate anchor {anchor.group(1)} "
                f"(first defined at line {first_line}, column {first_column})"
            )
        raise SpecError([SpecIssue(filename, line, column, "", message)]) from None
    except yaml.reader.ReaderError as exc:
        line, column = _text_pos(text, exc.position)
        char = exc.character if isinstance(exc.character, str) else chr(exc.character)
        message = f"character U+{ord(char):04X} is not allowed in YAML"
        raise SpecError([SpecIssue(filename, line, column, "", message)]) from None
    except yaml.YAMLError as exc:
        raise SpecError([SpecIssue(filename, 1, 1, "", f"invalid YAML: {exc}")]) from None
    if not isinstance(root, MappingNode):
        line, column = _pos(root.start_mark)
        message = (
            "the spec must be a mapping of keys (app, image, service, environments), "
            f"not {_kind(root)}"
        )
        raise SpecError([SpecIssue(filename, line, column, "", message)])
    return root


def _pos(mark: yaml.Mark | None) -> _Pos:
    if mark is None:
        return (1, 1)
    return (mark.line + 1, mark.column + 1)


def _text_pos(text: str, index: int) -> _Pos:
    line = text.count("\n", 0, index) + 1
    column = index - (text.rfind("\n", 0, index) + 1) + 1
    return (line, column)


def _kind(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    tag = node.tag.removeprefix(_TAG)
    return {"null": "null (empty)", "str": "a string", "int": "an integer"}.get(tag, f"a {tag}")


# --- node tree → plain values ---------------------------------------------------------------------


class _Abort(Exception):
    """Stop building at once (alias bomb, recursive alias): the rest would be noise."""

    def __init__(self, issue: SpecIssue) -> None:
        super().__init__(str(issue))
        self.issue = issue


@dataclass(frozen=True)
class _Where:
    key: _Pos | None
    value: _Pos


_SCALAR_TAGS = frozenset(
    _TAG + t for t in ("str", "int", "float", "bool", "null", "timestamp", "value", "merge")
)


class _Builder:
    """Builds plain Python values from a node tree, recording each value's position."""

    def __init__(self, filename: str, environ: Mapping[str, str]) -> None:
        self.filename = filename
        self.environ = environ
        self.tf_file: str | None = None
        """``terraform.outputs`` as written (read by the first ``${tf:NAME}``)."""
        self._tf_outputs: dict[str, TfOutput] | str | None = None
        self.issues: list[SpecIssue] = []
        self.where: dict[_Path, _Where] = {}
        self.poisoned: set[_Path] = set()
        self.extensions: dict[str, Any] = {}
        self._count = 0
        self._active: set[int] = set()
        self._constructor = SafeConstructor()
        self._resolver = Resolver()

    # Issues ---------------------------------------------------------------------------------

    def issue(self, pos: _Pos, path: _Path, message: str, *, poison: bool = True) -> None:
        self.issues.append(SpecIssue(self.filename, pos[0], pos[1], _dotted(path), message))
        if poison:
            self.poisoned.add(path)

    def position(self, path: _Path, *, key: bool = False) -> _Pos:
        for depth in range(len(path), -1, -1):
            where = self.where.get(path[:depth])
            if where is not None:
                if key and depth == len(path) and where.key is not None:
                    return where.key
                return where.value
        return (1, 1)

    def unknown_key_issue(self, path: _Path, model: type[BaseModel] | str | None) -> SpecIssue:
        if isinstance(model, str):  # "Spec": the root model, named to import it on use
            from castiron.spec.schema import Spec

            model = Spec
        key = str(path[-1])
        allowed = [n for n in model.model_fields if n != "extensions"] if model else []
        message = f"unknown key {key!r}"
        close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
        if close:
            message += f"; did you mean {close[0]!r}?"
        elif allowed:
            message += f" (expected one of: {', '.join(allowed)})"
        line, column = self.position(path, key=True)
        return SpecIssue(self.filename, line, column, _dotted(path), message)

    # Building -------------------------------------------------------------------------------

    def build_root(self, root: MappingNode) -> dict[str, Any]:
        self.where[()] = _Where(None, _pos(root.start_mark))
        self.tf_file = _terraform_outputs(root, self.environ)
        value = self._build(root, (), interpolate=True, raw=False, extensions=True)
        # A refused root (e.g. a custom tag) has already been reported as an issue.
        return value if isinstance(value, dict) else {}

    def tf_output(self, name: str) -> tuple[str, str | None]:
        """The value of Terraform output ``name`` for ``${tf:NAME}``, or an error message."""
        if self.tf_file is None:
            return "", (
                f"${{tf:{name}}} needs the Terraform outputs: name a state file or a "
                "`terraform output -json` file in terraform.outputs"
            )
        if self._tf_outputs is None:
            from castiron.spec.tfoutputs import outputs_path, read_outputs

            base = Path(self.filename).parent
            try:
                self._tf_outputs = read_outputs(outputs_path(base, self.tf_file))
            except ValueError as exc:
                self._tf_outputs = f"terraform.outputs: {exc}"
        if isinstance(self._tf_outputs, str):
            return "", self._tf_outputs
        output = self._tf_outputs.get(name)
        if output is None:
            known = ", ".join(sorted(self._tf_outputs)) or "none"
            return "", f"terraform output {name!r} is not in {self.tf_file} (outputs: {known})"
        if output.sensitive:
            return "", (
                f"terraform output {name!r} is sensitive: use it as a secret "
                f"(service.secrets.NAME: {{tf: {name}}}), never as a plain value"
            )
        return output.value, None

    def _count_node(self, node: Node) -> None:
        self._count += 1
        if self._count > MAX_NODES:
            line, column = _pos(node.start_mark)
            message = (
                f"more than {MAX_NODES} YAML nodes after expanding aliases; "
                "the file looks like an alias bomb"
            )
            raise _Abort(SpecIssue(self.filename, line, column, "", message))

    def _build(
        self, node: Node, path: _Path, *, interpolate: bool, raw: bool, extensions: bool = False
    ) -> object:
        self._count_node(node)
        if len(path) > MAX_DEPTH:
            self.issue(_pos(node.start_mark), path, f"nested too deeply (over {MAX_DEPTH})")
            return None
        if id(node) in self._active:
            line, column = _pos(node.start_mark)
            message = "recursive YAML alias: this node contains itself"
            raise _Abort(SpecIssue(self.filename, line, column, _dotted(path), message))
        if isinstance(node, ScalarNode):
            return self._scalar(node, path, interpolate=interpolate, raw=raw)
        if node.tag not in (_TAG + "map", _TAG + "seq"):
            self.issue(_pos(node.start_mark), path, _tag_message(node.tag))
            return None
        self._active.add(id(node))
        try:
            if isinstance(node, SequenceNode):
                items: list[object] = []
                for index, child in enumerate(node.value):
                    child_path = (*path, index)
                    self.where[child_path] = _Where(None, _pos(child.start_mark))
                    items.append(self._build(child, child_path, interpolate=interpolate, raw=raw))
                return items
            assert isinstance(node, MappingNode)
            return self._mapping(node, path, interpolate=interpolate, extensions=extensions)
        finally:
            self._active.discard(id(node))

    def _mapping(
        self, node: MappingNode, path: _Path, *, interpolate: bool, extensions: bool
    ) -> dict[str, Any]:
        result: dict[str, Any] = {}
        first_seen: dict[str, _Pos] = {}
        for key_node, value_node, merged in self._entries(node, path):
            key = self._key(key_node, path)
            if key is None:
                continue
            key_pos = _pos(key_node.start_mark)
            child_path = (*path, key)
            if key in first_seen:
                if not merged:
                    line, column = first_seen[key]
                    self.issue(
                        key_pos,
                        child_path,
                        f"duplicate key {key!r} (first defined at line {line}, column {column})",
                        poison=False,
                    )
                continue
            first_seen[key] = key_pos
            if key.startswith("x-"):
                if extensions:
                    self._count_node(key_node)
                    self.extensions[key] = self._build(
                        value_node, child_path, interpolate=False, raw=False
                    )
                continue
            self.where[child_path] = _Where(key_pos, _pos(value_node.start_mark))
            result[key] = self._build(
                value_node,
                child_path,
                interpolate=interpolate and not _matches(child_path, _DEPLOY_TIME),
                raw=_is_raw_map(path),
            )
        return result

    def _entries(self, node: MappingNode, path: _Path) -> list[tuple[Node, Node, bool]]:
        """The mapping's (key, value, merged?) pairs: its own first, then ``<<`` merges."""
        own: list[tuple[Node, Node, bool]] = []
        merged: list[tuple[Node, Node, bool]] = []
        for key_node, value_node in node.value:
            if key_node.tag != _TAG + "merge":
                own.append((key_node, value_node, False))
                continue
            sources = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
            for source in sources:
                self._count_node(source)
                if not isinstance(source, MappingNode):
                    message = "a merge key (<<) needs a mapping or a list of mappings"
                    self.issue(_pos(source.start_mark), path, message)
                    continue
                if id(source) in self._active:
                    line, column = _pos(source.start_mark)
                    message = "recursive YAML alias: this node contains itself"
                    raise _Abort(SpecIssue(self.filename, line, column, _dotted(path), message))
                self._active.add(id(source))
                try:
                    merged.extend((k, v, True) for k, v, _ in self._entries(source, path))
                finally:
                    self._active.discard(id(source))
        return own + merged

    def _key(self, node: Node, path: _Path) -> str | None:
        self._count_node(node)
        pos = _pos(node.start_mark)
        if not isinstance(node, ScalarNode):
            self.issue(pos, path, f"keys must be plain strings, not {_kind(node)}")
            return None
        if node.tag not in (_TAG + "str", _TAG + "value"):
            if node.tag not in _SCALAR_TAGS:
                self.issue(pos, path, _tag_message(node.tag))
            else:
                kind = node.tag.removeprefix(_TAG)
                message = (
                    f"key {node.value!r} is not a string (YAML reads it as {kind}); "
                    "quote it if you mean the text"
                )
                self.issue(pos, path, message)
            return None
        return str(node.value)

    def _scalar(self, node: ScalarNode, path: _Path, *, interpolate: bool, raw: bool) -> object:
        tag = node.tag
        text: str = node.value
        pos = _pos(node.start_mark)
        if tag not in _SCALAR_TAGS:
            self.issue(pos, path, _tag_message(tag))
            return text
        if tag in (_TAG + "str", _TAG + "value", _TAG + "merge", _TAG + "timestamp"):
            if not interpolate or tag == _TAG + "timestamp" or "$" not in text:
                return text
            value, errors = interpolate_text(text, self.environ, self.tf_output)
            for error in errors:
                self.issue(pos, path, error)
            if errors:
                return text
            if node.style is None and not raw:
                # A plain scalar is typed after interpolation, as if written out: `${PORT}` → 8080.
                resolved: str = self._resolver.resolve(  # type: ignore[no-untyped-call]
                    ScalarNode, value, (True, False)
                )
                return self._typed(ScalarNode(resolved, value), pos, path, raw=False)
            return value
        return self._typed(node, pos, path, raw=raw)

    def _typed(self, node: ScalarNode, pos: _Pos, path: _Path, *, raw: bool) -> object:
        tag = node.tag
        if raw and node.style is None and tag != _TAG + "null":
            return str(node.value)
        try:
            if tag == _TAG + "null":
                return None
            if tag == _TAG + "bool":
                return self._constructor.construct_yaml_bool(node)
            if tag == _TAG + "int":
                return self._constructor.construct_yaml_int(node)
            if tag == _TAG + "float":
                return self._constructor.construct_yaml_float(node)
        except (ValueError, ConstructorError):
            kind = {"int": "integer", "float": "number", "bool": "boolean"}.get(
                tag.removeprefix(_TAG), tag
            )
            self.issue(pos, path, f"{node.value!r} is not a valid {kind}")
            return None
        return str(node.value)


def _terraform_outputs(root: MappingNode, environ: Mapping[str, str]) -> str | None:
    """``terraform.outputs`` of the spec as written (``${VAR}`` resolved), or None."""
    for key, value in root.value:
        if not (isinstance(key, ScalarNode) and key.value == "terraform"):
            continue
        if not isinstance(value, MappingNode):
            return None
        for inner_key, inner in value.value:
            named = isinstance(inner_key, ScalarNode) and inner_key.value == "outputs"
            if named and isinstance(inner, ScalarNode) and inner.value:
                text, errors = interpolate_text(str(inner.value), environ)
                return None if errors else text
    return None


def _is_raw_map(path: _Path) -> bool:
    return any(_matches(path, (pattern,)) for pattern in _RAW_VALUE_MAPS)


def _matches(path: _Path, patterns: tuple[tuple[str | None, ...], ...]) -> bool:
    """True when ``path`` equals one of ``patterns`` (``None`` matches any one part)."""
    return any(
        len(pattern) == len(path)
        and all(p is None or p == q for p, q in zip(pattern, path, strict=True))
        for pattern in patterns
    )


def _tag_message(tag: str) -> str:
    shown = "!!" + tag.removeprefix(_TAG) if tag.startswith(_TAG) else tag
    return f"the YAML tag {shown!r} is not allowed; write plain YAML values"


def _dotted(path: _Path) -> str:
    return ".".join(str(p) for p in path)


_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TF_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
TF_PREFIX = "tf:"
"""``${tf:NAME}``: the Terraform output NAME (see :mod:`castiron.spec.tfoutputs`)."""


def interpolate_text(
    text: str,
    environ: Mapping[str, str],
    terraform: Callable[[str], tuple[str, str | None]] | None = None,
) -> tuple[str, list[str]]:
    """Replace ``${VAR}``, ``${VAR:-default}`` and ``${tf:NAME}`` in ``text``; ``$${`` is a
    literal ``${``.

    The default applies when the variable is unset or empty. ``terraform`` gives the value
    of a Terraform output, or why it cannot (None: ``${tf:NAME}`` is an error). Returns the
    new text and the problems found (an unset variable without a default, a malformed
    reference, an output that cannot be used); it raises nothing.
    """
    out: list[str] = []
    errors: list[str] = []
    i = 0
    while True:
        j = text.find("$", i)
        if j < 0:
            out.append(text[i:])
            break
        out.append(text[i:j])
        if text.startswith("$${", j):
            out.append("${")
            i = j + 3
            continue
        if not text.startswith("${", j):
            out.append("$")
            i = j + 1
            continue
        end = text.find("}", j + 2)
        if end < 0:
            errors.append(
                "unclosed '${': write ${NAME} or ${NAME:-default}, or $${ for a literal '${'"
            )
            out.append(text[j:])
            break
        expr = text[j + 2 : end]
        name, sep, default = expr.partition(":-")
        if expr.startswith(TF_PREFIX):
            output = expr.removeprefix(TF_PREFIX)
            if not _TF_NAME.match(output):
                errors.append(f"'${{{expr}}}' is not a valid reference: write ${{tf:OUTPUT}}")
            elif terraform is None:
                errors.append(
                    f"${{{expr}}} needs the Terraform outputs: name a state file or a "
                    "`terraform output -json` file in terraform.outputs"
                )
            else:
                found, error = terraform(output)
                if error is not None:
                    errors.append(error)
                out.append(found)
        elif not _VAR_NAME.match(name):
            errors.append(
                f"'${{{expr}}}' is not a valid reference: write ${{NAME}} or "
                "${NAME:-default}, or $${ for a literal '${'"
            )
        else:
            value = environ.get(name)
            if sep and not value:
                value = default
            if value is None:
                errors.append(
                    f"environment variable {name} is not set "
                    f"(set it, or write ${{{name}:-default}})"
                )
                value = ""
            out.append(value)
        i = end + 1
    return "".join(out), errors


# --- validation errors → issues -----------------------------------------------------------------

_TYPE_MESSAGES = {
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
}
_PATH_PREFIX = re.compile(r"^([A-Za-z0-9_.-]+): (.+)$", re.DOTALL)


def _translate(exc: ValidationError, data: dict[str, Any], builder: _Builder) -> list[SpecIssue]:
    issues: list[SpecIssue] = []
    seen: set[tuple[object, ...]] = set()
    for error in exc.errors(include_url=False):
        path, on_key, rest = _locate(error["loc"], data)
        kind = error["type"]
        message = _message(error, rest)
        if kind in ("value_error", "assertion_error") and not on_key:
            m = _PATH_PREFIX.match(message)
            if m:
                # Model validators name the field they object to: `a.b: message`.
                target = tuple(_parse_part(p) for p in m.group(1).split("."))
                full = (*path, *target)
                if full in builder.where:
                    path, message = full, m.group(2)
        if kind == "extra_forbidden":
            issue = builder.unknown_key_issue(path, _model_at(path[:-1]))
        else:
            line, column = builder.position(path, key=on_key)
            issue = SpecIssue(builder.filename, line, column, _dotted(path), message)
        dedupe_key = (path, on_key, message if kind == "missing" else None)
        if dedupe_key in seen or any(path[: len(p)] == p for p in builder.poisoned):
            continue
        seen.add(dedupe_key)
        issues.append(issue)
    return issues


def _indexes(container: object, part: str | int) -> bool:
    if isinstance(container, dict):
        return isinstance(part, str) and part in container
    if isinstance(container, list):
        return isinstance(part, int) and 0 <= part < len(container)
    return False


def _parse_part(part: str) -> _PathPart:
    return int(part) if part.isdigit() else part


def _locate(loc: Sequence[str | int], data: object) -> tuple[_Path, bool, list[str | int]]:
    """Split a pydantic location into the path into ``data``, a dict-key flag, and the rest."""
    current = data
    path: list[_PathPart] = []
    on_key = False
    rest: list[str | int] = []
    for part in loc:
        if part == "[key]":
            on_key = True
        elif not rest and _indexes(current, part):
            path.append(part)
            current = current[part]  # type: ignore[index]
        else:
            rest.append(part)
    return tuple(path), on_key, rest


def _message(error: Mapping[str, Any], rest: list[str | int]) -> str:
    kind: str = error["type"]
    ctx: Mapping[str, Any] = error.get("ctx") or {}
    if kind == "missing":
        return f"missing required key {str(rest[-1]) if rest else '?'!r}"
    if kind in _TYPE_MESSAGES:
        return _TYPE_MESSAGES[kind]
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        word = {
            "greater_than_equal": ("ge", "at least"),
            "greater_than": ("gt", "greater than"),
            "less_than_equal": ("le", "at most"),
            "less_than": ("lt", "less than"),
        }[kind]
        return f"must be {word[1]} {ctx.get(word[0])}"
    if kind in ("literal_error", "enum"):
        expected = str(ctx.get("expected", ""))
        message = f"must be one of {expected}" if " or " in expected else f"must be {expected}"
        given = error.get("input")
        if isinstance(given, str):
            choices = re.findall(r"'([^']*)'", expected)
            close = difflib.get_close_matches(given, choices, n=1, cutoff=0.6)
            if close:
                message += f"; did you mean {close[0]!r}?"
        return message
    msg = str(error.get("msg", "is invalid"))
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    if msg[:1].isupper() and msg[1:2].islower():
        msg = msg[:1].lower() + msg[1:]
    return msg


def _dedupe(issues: list[SpecIssue]) -> list[SpecIssue]:
    seen: set[SpecIssue] = set()
    out: list[SpecIssue] = []
    for issue in issues:
        if issue not in seen:
            seen.add(issue)
            out.append(issue)
    return out


def _model_at(path: _Path) -> type[BaseModel] | None:
    """The schema model that validates the mapping at ``path``, if any."""
    from castiron.spec.schema import Spec

    current: object = Spec
    for part in path:
        current = _step(current, part)
        if current is None:
            return None
    models = _models_in(current)
    return models[0] if models else None


def _step(annotation: object, part: _PathPart) -> object:
    for model in _models_in(annotation):
        if isinstance(part, str) and part in model.model_fields:
            return model.model_fields[part].annotation
        return None
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _step(args[0], part)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            found = _step(arg, part)
            if found is not None:
                return found
        return None
    if origin is dict and len(args) == 2:
        return args[1]
    if origin in (tuple, list) and args:
        return args[0]
    return None


def _models_in(annotation: object) -> list[type[BaseModel]]:
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _models_in(args[0])
    if origin in (typing.Union, types.UnionType):
        return [m for arg in args for m in _models_in(arg)]
    return []


__all__ = [
    "MAX_BYTES",
    "MAX_DEPTH",
    "MAX_NODES",
    "LoadedSpec",
    "ReadSpec",
    "interpolate_text",
    "load_spec",
    "load_spec_text",
    "read_spec",
]
