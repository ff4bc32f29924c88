"""What the holdout needs from the dataset beside the training table: item columns, the context transform, an oracle.

``models.evaluation.holdout`` cannot import the feature repository or the data
generators (``models/`` runs on a machine with torch alone), so the
dataset-side pieces of the unshown-items protocol are gathered here and
passed in: which columns describe an item (from the feature schema), the
request-time transform that recomputes item-dependent crosses for a
candidate, and, for a synthetic log, the generator's own probabilities.
"""

from __future__ import annotations

from pathlib import Path


def holdout_inputs(data: Path | str) -> dict:
    """Keyword arguments for ``models.evaluation.holdout.evaluate_holdout``; {} for a bare training parquet."""
    from feature_repo.schema import FeatureSchema
    from feature_repo.transforms import context_features
    from feature_repo.store import StoreSettings

    data = Path(data)
    if not data.is_dir():
        return {}
    out = {"recompute": context_features, "oracle": generator_oracle(data)}
    try:
        out["item_columns"] = FeatureSchema.load(StoreSettings.for_dataset(data).tables).item_columns
    except FileNotFoundError:
        pass
    return out


def generator_oracle(data: Path | str):
    """The generator's own probabilities when one of this project's scenarios wrote the log, else None.

    Each scenario's ``oracle`` recognises its own manifest, so asking each in turn finds the one that
    applies; a user's log gets None and is judged without an upper bound.
    """
    from flows.data import short_video, synth

    for scenario in (synth, short_video):
        found = scenario.oracle(data)
        if found is not None:
            return found
    return None
