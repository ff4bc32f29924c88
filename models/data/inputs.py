"""The model's inputs as the config chooses them: which features, and how wide their embeddings.

Why strict: ``data.features`` and ``model.embedding_dims`` are mappings the config schema leaves free (their
keys and values name features), and both used to drop what they did not recognise: a misspelt
``categoricals:`` trained with no categorical feature, a feature the table lacks was skipped, and a width for
``huor`` was never used. Each now fails, naming the setting and the closest valid name, and every check needs
only the table's column names, so it runs before any row is read.
"""

from __future__ import annotations

import difflib

from models.config import ConfigError
from models.contract.declaration import suggest

FEATURE_KEYS = ("categorical", "numeric", "log1p")
BINS = "#bins"  # the embedding slot of a numeric feature's quantile bins (models/data/binning.py)


def resolve_features(chosen, offered: dict | None, columns=None) -> dict[str, list[str]]:
    """The model's inputs: ``auto`` takes what the training table offers; a mapping chooses among its columns.

    With ``columns`` (the training table's), every chosen feature must be one of them.
    """
    if chosen in (None, "auto"):
        if not offered:
            raise ValueError("the config says data.features: auto, but the training table lists no features "
                             "(rebuild it with `mtlrec features build DATASET`, or list them in the config)")
        feats = {k: list(offered.get(k, [])) for k in FEATURE_KEYS}
        where = "data.features (auto: the training table's own list)"
        if columns is not None:
            require_columns(feats["categorical"] + feats["numeric"], columns, where)
        return feats
    if not isinstance(chosen, dict):
        raise ConfigError(f"data.features must be auto or {{categorical: [...], numeric: [...]}}, not {chosen!r}")
    for key in chosen:
        if key not in FEATURE_KEYS:
            close = difflib.get_close_matches(str(key), FEATURE_KEYS, n=1)
            hint = f"; did you mean 'data.features.{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key 'data.features.{key}'{hint} (known here: {list(FEATURE_KEYS)})")
    feats = {k: _names(chosen.get(k), f"data.features.{k}") for k in ("categorical", "numeric")}
    if columns is not None:
        for key in ("categorical", "numeric"):
            require_columns(feats[key], columns, f"data.features.{key}")
    if "log1p" in chosen:  # named here: each must be a chosen numeric feature
        feats["log1p"] = _names(chosen["log1p"], "data.features.log1p")
        stray = [c for c in feats["log1p"] if c not in feats["numeric"]]
        if stray:
            raise ConfigError(f"data.features.log1p: {stray[0]!r} is not in data.features.numeric"
                              + suggest(stray[0], feats["numeric"]))
    else:  # the table's counts, among the numeric features chosen
        feats["log1p"] = [c for c in (offered or {}).get("log1p", []) if c in feats["numeric"]]
    return feats


def require_columns(names: list[str], columns, where: str) -> None:
    """Every feature in ``names`` is a column of the table; else a ``ConfigError`` naming the closest column."""
    present = set(columns)
    missing = [c for c in names if c not in present]
    if missing:
        raise ConfigError(f"{where}: {missing[0]!r} is not a column of the training table"
                          + suggest(missing[0], present) + (f" (nor are {missing[1:]})" if len(missing) > 1 else ""))


def check_embedding_dims(dims, categorical: list[str], numeric: list[str], binned: bool = True) -> dict[str, int]:
    """``model.embedding_dims``: a positive width per categorical feature, or per numeric feature's bins."""
    if dims is None:
        return {}
    if not isinstance(dims, dict):
        raise ConfigError(f"model.embedding_dims must map feature names to widths, e.g. {{hour: 4}}, not {dims!r}")
    slots = [*categorical, *(f"{c}{BINS}" for c in numeric if binned)]
    for name, width in dims.items():
        if name not in slots:
            if name in numeric and binned:
                hint = f" (numeric: no embedding of its own; the slot of its quantile bins is {name + BINS!r})"
            elif str(name).endswith(BINS) and not binned:
                hint = " (data.numeric_bins is none: no numeric feature is binned)"
            else:
                hint = suggest(name, slots)
            raise ConfigError(f"model.embedding_dims: {name!r} is not a categorical feature of this run{hint}")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ConfigError(f"model.embedding_dims.{name} must be a positive whole number, not {width!r}")
    return dict(dims)


def _names(values, where: str) -> list[str]:
    if values is None:
        return []
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        raise ConfigError(f"{where} must be a list of column names, not {values!r}")
    return list(values)
