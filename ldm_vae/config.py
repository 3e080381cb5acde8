"""Strict configuration: typed dataclasses loaded from YAML, with dotted KEY=VALUE overrides.

Each stage declares its own dataclasses next to its code (`data/config.py`,
`autoencoder/config.py`, `diffusion/config.py`, `run/config.py`) and checks its fields in
`__post_init__` with the helpers below, so a rule moves with its field (torchtitan's
`Config` habit). This module only loads: an unknown key, a wrong type or a rule broken
raises `UserError` naming the key and the file (nanoGPT's configurator refuses unknown
keys; LlamaGen's `vq_train.py` shows what happens without it: flags that nothing reads).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

# Keys that older versions wrote into every saved config and that no longer exist, with the
# only value they could usefully hold. Saved configs (checkpoints, exports) load with them
# dropped; a user's YAML that names them gets the usual unknown-key error.
RETIRED_KEYS = {"model.in_channels": 3, "model.out_channels": 3,
                # training must sample the posterior as the export does: with diffusers' own
                # log-variance clamp, [-30, 20] (a tighter one reached training only)
                "loss.logvar_min": -30.0, "loss.logvar_max": 20.0}


# --- rules, called from the dataclasses' __post_init__ ---------------------------------------

class FieldError(UserError):
    """A broken rule of one field; `key` is relative to the dataclass that raised it, and the
    loader prefixes the section and the file."""

    def __init__(self, key: str, message: str):
        super().__init__(f"'{key}' {message}")
        self.key, self.message = key, message


def one_of(cfg: Any, name: str, allowed) -> None:
    value = getattr(cfg, name)
    if value not in allowed:
        raise FieldError(name, f"must be one of {', '.join(map(str, allowed))}, got {value!r}")


def _check(cfg: Any, names: tuple[str, ...], ok, what: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is not None and not ok(value):
            raise FieldError(name, f"must be {what}, got {value!r}")


def positive(cfg: Any, *names: str) -> None:
    _check(cfg, names, lambda v: v > 0, "> 0")


def non_negative(cfg: Any, *names: str) -> None:
    _check(cfg, names, lambda v: v >= 0, ">= 0")


def unit_interval(cfg: Any, *names: str) -> None:
    _check(cfg, names, lambda v: 0 <= v < 1, "in [0, 1)")


def probability(cfg: Any, *names: str) -> None:
    _check(cfg, names, lambda v: 0 <= v <= 1, "in [0, 1]")


def multiples(cfg: Any, name: str, of: str, section: str) -> None:
    """A non-empty list field whose entries are positive multiples of the field `of`
    (channel widths and GroupNorm's group count)."""
    values, divisor = getattr(cfg, name), getattr(cfg, of)
    if not values or any(v <= 0 or v % divisor for v in values):
        raise FieldError(name, f"must be positive multiples of '{section}.{of}' ({divisor}), got {values}")


def unused(cfg: Any, names, reason: str) -> None:
    """Fields in `names` (dotted paths below `cfg`) must keep their defaults: they mean
    nothing under `reason`, and a set value would be silently ignored."""
    changed = [k for k in names if get_key(cfg, k) != _default(type(cfg), k)]
    if changed:
        raise FieldError(changed[0], f"does not apply to {reason}; remove it"
                         + (f" (also: {', '.join(changed[1:])})" if changed[1:] else ""))


def _default(cls: type, dotted: str) -> Any:
    """The declared default of a (dotted) field of dataclass `cls`, without building one."""
    *sections, name = dotted.split(".")
    for section in sections:
        cls = typing.get_type_hints(cls)[section]
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


# --- loading -----------------------------------------------------------------------------------

def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Return `value` as type `tp` or raise a UserError naming `key` and `source`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key, source)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise UserError(f"{source}: '{key}' must be a list, got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # PyYAML (YAML 1.1) reads `1e-4` (no dot) as a string; accept what float() reads
        try:
            return float(value)
        except ValueError:
            pass
    # bool is a subclass of int: `batch_size: true` must not pass as 1
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise UserError(f"{source}: '{key}' must be {tp.__name__}, got {value!r} ({type(value).__name__})")


def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    if not isinstance(raw, dict):
        raise UserError(f"{source}: '{prefix or 'the top level'}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    where = f"{prefix}." if prefix else ""
    if unknown:
        raise UserError(f"{source}: unknown key '{where}{unknown[0]}' (known keys: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in raw.items():
        key = where + name
        tp = hints[name]
        kwargs[name] = _build(tp, value, key, source) if dataclasses.is_dataclass(tp) else _coerce(value, tp, key,
                                                                                                    source)
    try:
        return cls(**kwargs)
    except FieldError as e:
        raise UserError(f"{source}: '{where}{e.key}' {e.message}") from None


def get_key(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _set_dotted(raw: dict, dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"{source}: '{dotted}' goes through '{part}', which is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`a.b=1` -> ('a.b', 1). Values are parsed as YAML, so `lr=1e-4`, `flip=false`, `[8,16]` work."""
    out = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"override '{item}' must look like KEY=VALUE, e.g. train.max_steps=500")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError as e:
            raise UserError(f"override '{item}': the value is not valid YAML ({e.problem})") from None
        out.append((key.strip(), value))
    return out


def bundled_configs() -> list[str]:
    """Names of the configs that ship inside the package (usable without the checkout)."""
    return sorted(p.name[:-5] for p in importlib.resources.files("ldm_vae").joinpath("configs").iterdir()
                  if p.name.endswith(".yaml"))


def read_config_text(path: str | Path) -> tuple[str, str]:
    """(YAML text, source name) of a config file, or of a bundled config named without a folder
    (`kl_f4_fashion` or `kl_f4_fashion.yaml`)."""
    path = Path(path)
    if path.is_file():
        return path.read_text(), str(path)
    name = path.name[:-5] if path.name.endswith(".yaml") else path.name
    if path.parent == Path(".") and name in bundled_configs():
        resource = importlib.resources.files("ldm_vae").joinpath("configs", f"{name}.yaml")
        return resource.read_text(), f"{name}.yaml (bundled with ldm-vae)"
    raise UserError(f"config file {path} does not exist (bundled configs, usable by name: "
                    f"{', '.join(bundled_configs())})")


def load_config(path: str | Path | None, overrides: list[str], schema: type) -> Any:
    """Load a YAML config (the schema's defaults when `path` is None; a bundled config by
    name) into `schema` and apply KEY=VALUE overrides."""
    raw: Any = {}
    source = "defaults"
    if path is not None:
        text, source = read_config_text(path)
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{source} is not valid YAML: {e}") from None
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(raw, key, value, f"{source} (override {key}={value!r})")
    return from_dict(raw, source, schema)


def load_saved_config(raw: dict | str | Path, source: str, schema: type) -> Any:
    """A config that ldm-vae itself wrote (a checkpoint's trainer_state.json, an export's
    training_config.yaml), from any version: retired keys holding their one working value are
    dropped. `raw` is the dict, or the YAML file."""
    if not isinstance(raw, dict):
        raw = yaml.safe_load(Path(raw).read_text()) or {}
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for dotted, value in RETIRED_KEYS.items():
        section, _, name = dotted.rpartition(".")
        node = raw.get(section)
        if isinstance(node, dict) and name in node and node[name] == value:
            del node[name]
    return from_dict(raw, source, schema)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_dict(raw: dict, source: str, schema: type) -> Any:
    return _build(schema, raw, "", source)
