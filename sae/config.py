"""Plain dataclass configs, read from YAML with `key=value` overrides.

Each stage module defines its own dataclass; this module only turns dictionaries into them. Every field is
documented by the string literal right below it (as in the stdlib's attribute docstrings), which is what
`sae <stage> --help` prints, so the docs cannot drift from the code.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class UserError(ValueError):
    """Bad input from the user (a config, a path, a cache); the message says what to do. The CLI prints it."""


class ConfigError(UserError):
    """A config that cannot be used; the message names the key and what would be valid."""


def _closest(key: str, valid: list[str]) -> str:
    guess = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean {guess[0]!r}?" if guess else ""
    return f"{hint} Valid keys: {', '.join(valid)}."


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


@dataclasses.dataclass(frozen=True)
class Typed:
    """A command-line override value exactly as typed. It is read only once its field's type is known, because
    `text="def f(x): return x"` is a string for a `str` field while `batch_size=512` is YAML for an `int` one."""

    raw: str

    def resolve(self, tp: Any) -> Any:
        """The string itself for a field that takes text; otherwise the value YAML reads (an empty value is "")."""
        args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        if not self.raw.strip():
            return ""
        parsed = _parse_yaml(self.raw)
        if str in args and not (parsed is None and type(None) in args):
            return self.raw
        return parsed


def _parse_yaml(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"override value {raw!r} is not valid YAML: {err}") from err


def _yaml11_number(text: str) -> Any:
    """PyYAML follows YAML 1.1, which reads `1e-3` and `2e6` (no dot) as text: a number field takes them as numbers."""
    try:
        return float(text) if any(c.isdigit() for c in text) else text
    except ValueError:
        return text


def _number_text(value: Any, tp: Any) -> Any:
    """A YAML 1.1 number read as text (`1e30`) as the number, where `tp` is numeric; anything else as it is."""
    if tp not in (float, int) or not isinstance(value, str):
        return value
    number = _yaml11_number(value)
    return int(number) if tp is int and isinstance(number, float) and number.is_integer() else number


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against annotation `tp`, building nested dataclasses; ints are accepted for floats."""
    if isinstance(value, Typed):
        value = value.resolve(tp)
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: unexpected value {value!r}")
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return from_dict(tp, value, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            value = [value]
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_tp, value_tp = typing.get_args(tp) or (Any, Any)
        # YAML 1.1 text such as `1e30` is read as the number for a numeric key or value, as for a numeric field (other
        # values are left for the stage to check, which names what is wrong in its own terms)
        return {_number_text(k, key_tp): _number_text(v, value_tp) for k, v in value.items()}
    if tp in (float, int) and isinstance(value, str):
        value = _yaml11_number(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)  # YAML reads 1e6 as a float; a token count of 1e6 is meant as an int
    if (isinstance(tp, type) and not isinstance(value, tp)) or (tp in (int, float) and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")  # a bool is an int to Python, not here
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from `data`; an unknown key is an error naming the closest valid one."""
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"unknown config key {path!r}.{_closest(key, fields)}")
        kwargs[key] = _coerce(value, hints[key], path)
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:  # named as the user sets them, not as Python's TypeError names constructor arguments
        settings = " ".join(f"{name}=..." for name in missing)
        raise ConfigError(f"{where or cls.__name__}: {', '.join(missing)} {'has' if len(missing) == 1 else 'have'} "
                          f"no default; set {settings} (on the command line or in the config file's section)")
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`a.b=1 c=[x,y]` → {"a": {"b": Typed("1")}, "c": Typed("[x,y]")}: values are read (as YAML, or as the
    string typed for a `str` field) by `from_dict`, which knows each field's type."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. max_tokens=100000)")
        key, raw = item.split("=", 1)
        node = out
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = Typed(raw)
    return out


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a folder; pass a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text; pass a YAML config file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (harvest:, train:, ...)")
    bad = [k for k, v in data.items() if v is not None and not isinstance(v, dict)]
    if bad:
        raise ConfigError(f"{path}: section(s) {bad} must each hold a mapping of keys (e.g. `train:` then "
                          "indented `out: runs/x`)")
    return data


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring of each field of a dataclass and its bases: the string written under the field, or the field's
    `metadata["doc"]` (for fields made by `dataclasses.make_dataclass`, which have no source to read)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if _is_dataclass_type(klass):
            docs.update({f.name: f.metadata["doc"] for f in dataclasses.fields(klass) if "doc" in f.metadata})
        docs.update(_source_docs(klass))
    return docs


def _source_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field in the body of `cls` itself."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and not ast.unparse(stmt.annotation).startswith("ClassVar")  # class settings, not keys
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


HelpSections = tuple[tuple[str, tuple[str, ...]], ...]
"""A config's ``help_sections``: (title, field names) in the order `--help` shows them, most used first."""


def help_groups(cls: type) -> list[tuple[str, list[dataclasses.Field]]]:
    """The fields of `cls` in its ``help_sections`` (every field in exactly one), or one untitled group without."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    sections = getattr(cls, "help_sections", None)
    if sections is None:
        return [("", list(fields.values()))]
    listed = [name for _, names in sections for name in names]
    if sorted(listed) != sorted(fields):
        raise ValueError(f"{cls.__name__}.help_sections must name each field once; missing "
                         f"{sorted(set(fields) - set(listed))}, unknown or repeated "
                         f"{sorted(n for n in set(listed) if n not in fields or listed.count(n) > 1)}")
    return [(title, [fields[n] for n in names]) for title, names in sections]


def describe(cls: type, prefix: str = "", indent: str = "  ") -> str:
    """One line per key (nested dataclasses expanded) with type, default and doc, grouped by the class's
    ``help_sections``: the `--help` text."""
    lines = []
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for title, group in help_groups(cls):
        if title:
            lines.append(f"{indent}{prefix.removesuffix('.')} — {title}:" if prefix else f"\n{title}:")
        for f in group:
            tp = hints[f.name]
            name = f"{prefix}{f.name}"
            if f.default is not dataclasses.MISSING:
                default = repr(f.default)
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = repr(f.default_factory())  # type: ignore[misc]
            else:
                default = "(required)"
            tp_name = tp.__name__ if typing.get_origin(tp) is None and hasattr(tp, "__name__") else str(tp).replace("typing.", "")
            lines.append(f"{indent}{name}: {tp_name} = {default}\n{indent}    {docs.get(f.name, '')}".rstrip())
            inner = [a for a in typing.get_args(tp) if _is_dataclass_type(a)]
            if inner:
                lines.append(describe(inner[0], prefix=f"{name}[].", indent=indent + "  ").rstrip("\n"))
    return "\n".join(lines).lstrip("\n") + "\n"
