"""What a request may set about itself: the dataset's declared context columns, and a bounded request time."""

from __future__ import annotations

import logging
import time
from datetime import timezone
from typing import Optional

from services import ranking

log = logging.getLogger("mtlrec.service")

FUTURE_S = 86_400.0  # how far past the server's clock a request's feature time may lie


def declared_context(dataset) -> tuple[dict[str, str], Optional[float]]:
    """The dataset's declared request-time columns (``{name: "string" | "float"}``; ``position`` is the service's
    to set) and when its data starts (epoch seconds), read from its feature schema and manifest."""
    from feature_repo.schema import FeatureSchema
    from feature_repo.store import StoreSettings
    from models.contract.tables import Manifest

    columns: dict[str, str] = {"device": "string"}
    try:
        columns = dict(FeatureSchema.load(StoreSettings.for_dataset(dataset).tables).log_context)
    except (FileNotFoundError, OSError, ValueError) as e:  # no store yet: `mtlrec serve` refuses to start anyway
        log.debug("request context from the contract alone: %s", e)
    columns.pop("position", None)
    try:
        manifest = Manifest.load(dataset)
        start = manifest.start_ts.timestamp() if manifest else None
    except Exception:  # noqa: BLE001 - a manifest that does not parse leaves the lower bound off
        start = None
    return columns, start


def request_time(context, earliest: Optional[float]) -> tuple[Optional[float], dict]:
    """The request time (epoch seconds, None for now) and the declared context columns the request set."""
    if context is None:
        return None, {}
    extra = {k: v for k, v in context.model_dump(exclude={"timestamp"}).items() if v is not None}
    if context.timestamp is None:
        return None, extra
    when = context.timestamp
    ts = (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()  # no zone given: UTC
    if earliest is not None and ts < earliest:
        start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(earliest))
        raise ranking.RequestError("context.timestamp", f"{context.timestamp.isoformat()} is before the data "
                                                        f"starts ({start})")
    if ts > time.time() + FUTURE_S:
        raise ranking.RequestError("context.timestamp", f"{context.timestamp.isoformat()} is more than a day past "
                                                        "the server's clock")
    return ts, extra
