"""YAML recipes -> typed `Recipe`.

* `base:` names another recipe (path relative to the file that names it, or a
  list of them); chains are followed and mappings merge deeply, later wins.
* Dotted overrides (`optim.lr=1e-3 model.loops=8`) are parsed as YAML scalars
  and applied after inheritance.
* Every key is checked against the dataclass schema: an unknown key is an error
  that names its full path and the closest valid name; a wrong type names the
  expected type.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import os
import types
import typing
from typing import Any, Iterable, Literal, Union, get_args, get_origin

import yaml

from looptrain.config.schema import Recipe, RecipeError
from looptrain.fileio import write_text_atomic


# ------------------------------------------------------------------ YAML files

# A recipe is a few hundred values; aliases that expand beyond these bounds are
# an alias bomb ("billion laughs"), which would hang whatever walks the value
# (type checks, error messages, dataclasses.asdict).
MAX_YAML_VALUES = 100_000
MAX_YAML_CHARS = 10_000_000


class YAMLTooLarge(yaml.YAMLError):
    """A YAML document whose aliases expand beyond the bounds above, or refer to themselves."""


class BoundedSafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that measures the composed document, aliases expanded, before constructing it.

    Composing is linear in the size of the text (an alias is a reference to the
    anchored node), so the bound is checked before any value is built.
    """

    def construct_document(self, node):
        _expanded_size(node, {}, set())
        return super().construct_document(node)


def _expanded_size(node: yaml.Node, memo: dict[int, tuple[int, int]], active: set[int]) -> tuple[int, int]:
    """(values, characters) of `node` with every alias expanded; raises YAMLTooLarge past the bounds."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in active:
        raise YAMLTooLarge(f"an alias refers to its own anchor (line {node.start_mark.line + 1}); "
                           "a recipe cannot contain itself")
    active.add(key)
    values, chars = 1, 0
    if isinstance(node, yaml.ScalarNode):
        chars = len(node.value)
    else:
        children = node.value if isinstance(node, yaml.SequenceNode) else [c for pair in node.value for c in pair]
        for child in children:
            v, c = _expanded_size(child, memo, active)
            values, chars = values + v, chars + c
            if values > MAX_YAML_VALUES or chars > MAX_YAML_CHARS:
                raise YAMLTooLarge(
                    f"its aliases expand to more than {MAX_YAML_VALUES:,} values or {MAX_YAML_CHARS:,} characters "
                    "(an alias bomb?); write the values out, or share settings with base:"
                )
    active.discard(key)
    memo[key] = (values, chars)
    return values, chars


def safe_load_bounded(stream: Any) -> Any:
    """yaml.safe_load with the alias-expansion bound of `BoundedSafeLoader`."""
    return yaml.load(stream, Loader=BoundedSafeLoader)


def read_yaml_mapping(path: str, *, kind: str, missing_hint: str, error: type[Exception] = RecipeError) -> dict:
    """A YAML file that must hold a mapping (an empty file is {}): recipes, cluster profiles, sweeps.

    Every failure is one `error` naming the file, and the line and column of a syntax error.
    """
    if not os.path.isfile(path):
        raise error(f"{path}: {kind} not found; {missing_hint}")
    try:
        with open(path, "rb") as f:  # bytes: PyYAML detects the encoding and names a bad byte
            data = safe_load_bounded(f)
    except OSError as err:
        raise error(f"{path}: cannot read the {kind} ({err.strerror}); check the path and its permissions") from None
    except RecursionError:
        raise error(f"{path}: the {kind} is nested too deeply to read; a {kind} is a shallow mapping") from None
    except YAMLTooLarge as err:
        raise error(f"{path}: {err}") from None
    except yaml.reader.ReaderError as err:
        raise error(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.position}); a {kind} is YAML "
                    "text") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise error(f"{path}:{where}: malformed YAML ({problem}); fix the syntax there") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{path}: a {kind} must be a YAML mapping of keys, got {type(data).__name__}")
    return data


def _read_yaml(path: str) -> dict:
    return read_yaml_mapping(path, kind="recipe file", missing_hint="check the path (recipes live under recipes/)")


def deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_raw(path: str, _chain: tuple[str, ...] = ()) -> dict:
    """Read a recipe file with its `base:` chain resolved (no schema check yet)."""
    path = os.path.abspath(path)
    if path in _chain:
        cycle = " -> ".join(os.path.relpath(p) for p in (*_chain, path))
        raise RecipeError(f"base: recipes inherit in a cycle: {cycle}")
    data = _read_yaml(path)
    bases = data.pop("base", None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise RecipeError(f"{path}: base: must be a path or a list of paths")
    merged: dict = {}
    for base in bases:
        base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
        merged = deep_merge(merged, load_raw(base_path, (*_chain, path)))
    return deep_merge(merged, data)


# ------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise RecipeError(f"override {text!r}: expected KEY=VALUE with a dotted key, e.g. optim.lr=1e-3")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override {text!r}: the key must be dotted names like model.loops")
    try:
        parsed = safe_load_bounded(value) if value.strip() else ""
    except YAMLTooLarge as err:
        raise RecipeError(f"override {key}: {err}") from None
    except (yaml.YAMLError, RecursionError):
        parsed = value
    return key.split("."), parsed


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return data


# ------------------------------------------------------------- schema checking


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp) if a is not type(None)) + " (or null)"
    if origin in (list, tuple):
        args = get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except RecipeError as err:
                errors.append(err)
        raise RecipeError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if value in choices:
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise RecipeError(f"{key}: {value!r} is not one of {', '.join(repr(c) for c in choices)}{hint}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (item,) = get_args(tp) or (Any,)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a mapping, got {value!r}")
        return copy.deepcopy(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return build_dataclass(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{key}: expected bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise RecipeError(f"{key}: expected int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise RecipeError(f"{key}: expected float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise RecipeError(f"{key}: expected str, got {value!r}")
    raise RecipeError(f"{key}: unsupported schema type {tp!r}")


def build_dataclass(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else ""
            valid = ", ".join(names)
            raise RecipeError(f"unknown recipe key {path!r}{hint} (valid keys here: {valid})")
        factory = fields[key].default_factory
        if isinstance(value, dict) and factory is not dataclasses.MISSING:
            default = factory()
            if dataclasses.is_dataclass(default):  # a section's own defaults (e.g. a monitor rule's halt
                value = deep_merge(dataclasses.asdict(default), value)  # threshold) stay unless set
        kwargs[key] = _convert(value, hints[key], path)
    return cls(**kwargs)


# --------------------------------------------------------------------- public


def recipe_from_dict(data: dict) -> Recipe:
    return build_dataclass(Recipe, data).validate()


def load_recipe(path: str, overrides: Iterable[str] = ()) -> Recipe:
    """Load, inherit, override, type-check and validate a recipe file."""
    data = apply_overrides(load_raw(path), list(overrides))
    try:
        return recipe_from_dict(data)
    except RecipeError as err:
        raise RecipeError(f"{path}: {err}") from None


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, default_flow_style=None)


def recipe_hash(recipe: Recipe) -> str:
    text = json.dumps(recipe_to_dict(recipe), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_resolved(recipe: Recipe, run_dir: str) -> str:
    """Write the fully resolved recipe into the run directory (atomically)."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "recipe.yaml")
    write_text_atomic(path, f"# resolved looptrain recipe (hash {recipe_hash(recipe)})\n" + recipe_to_yaml(recipe))
    return path


def diff_recipes(old: dict, new: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Flat list of (dotted key, old value, new value) where two recipes differ."""
    out = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}.{key}" if prefix else key
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(diff_recipes(a, b, path))
        elif a != b:
            out.append((path, a, b))
    return out
