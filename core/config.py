"""Typed configurations <-> YAML files, command-line flags and GUI forms.

A configuration is a (possibly nested) ``@dataclass``. The same schema is read
from YAML (:func:`load_yaml`), overridden by command-line flags
(:func:`apply_overrides`), edited in GUI forms (field ``metadata["help"]``) and
saved back (:func:`save_yaml`). Every value is type-checked; an unknown or
misspelt key is an error naming the file and the full key path, with the
closest valid key suggested. Nothing is silently ignored.

Supported field types: ``int``, ``float``, ``bool``, ``str``, ``Optional[T]``,
``Literal[...]`` choices, ``Tuple[T, T, T]`` (fixed length), ``Tuple[T, ...]``,
``List[T]`` and nested dataclasses. Field ``metadata`` may hold ``min``/``max``
(inclusive), ``gt`` (exclusive minimum) and ``help``. A dataclass may define
``validate(self)`` for checks across fields; it raises :class:`FieldProblem`.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, Dict, Literal, Mapping, Optional, Type, TypeVar, Union

import yaml

from core.errors import ConfigError

T = TypeVar("T")


class FieldProblem(Exception):
    """Raised by a dataclass ``validate()``: ``key`` (relative) and ``message``."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key
        self.message = message


def _fail(where: str, key: str, message: str) -> ConfigError:
    return ConfigError(f"{where}: key '{key}': {message}")


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check ``value`` against type ``tp``; return it converted (lists -> tuples...)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where=where, prefix=key)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], key, where)
        for a in inner:
            try:
                return _coerce(value, a, key, where)
            except ConfigError:
                continue
        raise _fail(where, key, f"{_show(value)} has the wrong type.")
    if origin is Literal:
        for a in args:  # True must not pass for 1, nor 1 for True
            if a == value and isinstance(a, bool) == isinstance(value, bool):
                return a
        allowed = ", ".join(str(a) for a in args)
        raise _fail(where, key, f"{_show(value)} is not one of {allowed}.")
    if origin in (tuple, list):
        if isinstance(value, str) and "," in value:  # "1,0.5,0.5" from a flag
            value = [v.strip() for v in value.split(",")]
            value = [yaml.safe_load(v) for v in value]
        if not isinstance(value, (list, tuple)):
            raise _fail(where, key, f"{_show(value)} should be a list{_list_hint(tp)}.")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _fail(where, key, f"{_show(list(value))} should have exactly "
                                        f"{len(args)} values{_list_hint(tp)}.")
            items = [_coerce(v, a, f"{key}[{i}]", where) for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_tp = args[0] if args else Any
            items = [_coerce(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _fail(where, key, f"{_show(value)} should be true or false.")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _fail(where, key, f"{_show(value)} should be a whole number.")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _fail(where, key, f"{_show(value)} should be a number.")
    if tp is str:
        if isinstance(value, str):
            return value
        raise _fail(where, key, f"{_show(value)} should be text.")
    raise TypeError(f"config field type {tp!r} is not supported")  # programming error


def _list_hint(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple and len(args) == 3 and Ellipsis not in args:
        return " of three numbers [z, y, x]"
    return ""


def _check_range(value: Any, meta: Mapping[str, Any], key: str, where: str) -> None:
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if "gt" in meta and not v > meta["gt"]:
            raise _fail(where, key, f"{_show(value)} is not allowed: values must be "
                                    f"greater than {meta['gt']}.")
        if "min" in meta and v < meta["min"]:
            raise _fail(where, key, f"{_show(value)} is not allowed: values must be "
                                    f"at least {meta['min']}.")
        if "max" in meta and v > meta["max"]:
            raise _fail(where, key, f"{_show(value)} is not allowed: values must be "
                                    f"at most {meta['max']}.")


def from_dict(cls: Type[T], data: Optional[Mapping[str, Any]], *, where: str = "config",
              prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping; missing keys keep their defaults.

    ``where`` names the source (a file name, "command line") in error messages;
    ``prefix`` is the key path of this section ("normalisation").
    """
    section = prefix or "the top level"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: {section} should be a mapping of 'key: value' "
                          f"lines, not {_show(data)}.")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs: Dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            close = difflib.get_close_matches(str(name), list(fields), n=1, cutoff=0.5)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"{where}: unknown key '{key}'.{hint} Valid keys in {section}: "
                f"{', '.join(fields)}.")
        value = _coerce(value, hints[name], key, where)
        _check_range(value, fields[name].metadata, key, where)
        kwargs[name] = value
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        try:
            obj.validate()
        except FieldProblem as prob:
            key = f"{prefix}.{prob.key}" if prefix else prob.key
            raise _fail(where, key, prob.message) from None
    return obj


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain dict/list/scalars (tuples become lists), ready for YAML."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(obj: T, overrides: Mapping[str, Any], *, where: str = "command line") -> T:
    """Return a copy of ``obj`` with dotted keys replaced ("targets.mode": "inner").

    Values go through the same checks as a YAML file; ``None`` values are skipped
    (a flag that was not given).
    """
    data = to_dict(obj)
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"{where}: unknown key '{dotted}'.")
            node = node[part]
        node[parts[-1]] = list(value) if isinstance(value, tuple) else value
    return from_dict(type(obj), data, where=where)


def to_yaml(obj: Any) -> str:
    """The YAML text of a config (keys in schema order)."""
    return yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=None)


def load_yaml(path: Union[str, Path], cls: Type[T], section: Optional[str] = None) -> T:
    """Read a YAML file into dataclass ``cls`` (or its top-level ``section``)."""
    path = Path(path)
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{where}: config file not found. Check the path.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{where}: cannot read the config file ({err}).") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{where}: not valid YAML{at}: {problem}. Fix the file "
                          "(indent with spaces, 'key: value' per line).") from None
    if section is not None:
        if not isinstance(data, Mapping) or section not in data:
            raise ConfigError(f"{where}: no '{section}:' section found; the file should "
                              f"have a top-level '{section}:' key.")
        return from_dict(cls, data[section], where=where, prefix=section)
    return from_dict(cls, data, where=where)


def save_yaml(path: Union[str, Path], obj: Any, header: str = "") -> Path:
    """Write ``obj`` as YAML, atomically; ``header`` lines become comments."""
    from core.io.atomic import atomic_path

    path = Path(path)
    text = "".join(f"# {line}\n" for line in header.splitlines()) + to_yaml(obj)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return path


def field_help(cls: Type[Any]) -> Dict[str, str]:
    """``{"section.key": help text}`` for every field (for CLI help and GUI tooltips)."""
    out: Dict[str, str] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update({f"{f.name}.{k}": v for k, v in field_help(hints[f.name]).items()})
        else:
            out[f.name] = f.metadata.get("help", "")
    return out
