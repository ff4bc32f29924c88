"""Run configuration from YAML: one file per model, runs reproducible from it alone.

A config may name ``extends: base`` (a path relative to itself, a path, or a
name under ``models/configs/``, so a config anywhere on disk can extend
``mmoe``); keys deep-merge over the base, so each file holds only what
differs. ``--set train.max_epochs=1`` style overrides are parsed as YAML
values.

Strict by design: a misspelt key (``train.max_epoch``) would otherwise be
carried along silently while the run used the default. Every key must exist
in ``base.yaml`` (free-form only under ``model.params``, ``balancer.params``
and the task list, which their own builders check, and under ``data.features``
and ``model.embedding_dims``, checked against the training table's columns by
``models/data/inputs.py``), and the error names the
closest known key. Numbers in exponent form (``1e-3``) are numbers, not the
strings YAML 1.1 makes of them.
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"
FREE_FORM = {("model", "params"), ("model", "embedding_dims"), ("balancer", "params"), ("tasks",), ("data", "features")}


class ConfigError(ValueError):
    """A config key or value the run cannot use; the message names the key and the nearest valid one."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1 with YAML 1.2's floats: ``1e-3`` and ``5E4`` are numbers."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+][0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_value(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def locate(name: str | Path, relative_to: Path | None = None) -> Path:
    """A config file by path, by path relative to another config, or by name under ``models/configs/``."""
    name = Path(name)
    candidates = [name] + ([relative_to / name] if relative_to is not None else [])
    candidates += [CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"]
    if name.suffix != ".yaml":
        candidates += [p.with_name(p.name + ".yaml") for p in candidates[:2]]
    for p in candidates:
        if p.is_file():
            return p
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"no config {str(name)!r}: give a YAML path or one of {known}")


def _read(path: Path) -> dict:
    try:
        data = yaml.load(path.read_text(), Loader=_Loader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping of settings")
    return data


def _load(path: Path) -> dict:
    cfg = _read(path)
    parent = cfg.pop("extends", None)
    if parent:
        cfg = deep_merge(_load(locate(parent, path.parent)), cfg)
    return cfg


def check_keys(cfg: dict, schema: dict, where: tuple[str, ...] = ()) -> None:
    """Every key of ``cfg`` must exist in ``schema`` (the base config), recursively, except under free-form keys."""
    for key, value in cfg.items():
        path = (*where, key)
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema), n=1)
            hint = f"; did you mean {'.'.join((*where, close[0]))!r}?" if close else ""
            raise ConfigError(f"unknown config key {'.'.join(path)!r}{hint} (known here: {sorted(schema)})")
        if path in FREE_FORM:
            continue
        if isinstance(value, dict) and isinstance(schema[key], dict):
            check_keys(value, schema[key], path)


def load_config(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    return apply_overrides(_load(locate(path)), overrides)


def with_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` over the base config: a dict built in code gets the same defaults, and the same check, as a file."""
    base = _load(CONFIG_DIR / "base.yaml")
    check_keys(config, base)
    return deep_merge(base, config)


def apply_overrides(config: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """A copy of ``config`` with ``key.sub=value`` settings applied, checked against the base config's keys."""
    cfg = copy.deepcopy(config)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            if node.get(p) in (None, "auto"):  # e.g. data.features.categorical=[...] over features: auto
                node[p] = {}
            nxt = node[p]
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {p!r} holds a value, not a group of settings")
            node = nxt
        node[parts[-1]] = parse_value(value)
    check_keys(cfg, _load(CONFIG_DIR / "base.yaml"))
    return cfg
