"""Request and response shapes of the ranking API (pydantic; BentoML turns them into OpenAPI and validation).

Field constraints live here, so a malformed request is refused by BentoML's own validation with
a 400 whose ``detail`` names the field (``loc``) and the reason (``msg``) before any work is done.
Checks that need the loaded model (objective names) or two fields at once (``k`` against the
number of candidates) run in the service and answer in the same shape.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model

from models.settings import get_settings


def max_candidates() -> int:
    """``MTLREC_MAX_CANDIDATES`` as the environment holds it now."""
    return get_settings().max_candidates


MAX_CANDIDATES = max_candidates()  # fixed when the service module is imported: it shapes the OpenAPI schema

Id = Annotated[str, Field(min_length=1, max_length=256)]


def _unique(ids: list[str]) -> list[str]:
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = [i for i in ids if i in seen or seen.add(i)]
        raise ValueError(f"candidates must be unique; duplicated: {sorted(set(dup))[:5]}")
    return ids


Candidates = Annotated[list[Id], Field(min_length=1, max_length=MAX_CANDIDATES), AfterValidator(_unique)]
Weight = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Weights = Optional[dict[str, Weight]]
Diversity = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
K = Optional[Annotated[int, Field(ge=1, le=MAX_CANDIDATES)]]
Fusion = Literal["product", "sum"]


MAX_CONTEXT_STRING = 64
MAX_CONTEXT_NUMBER = 1e9
ContextString = Annotated[str, Field(max_length=MAX_CONTEXT_STRING)]
ContextNumber = Annotated[float, Field(allow_inf_nan=False, ge=-MAX_CONTEXT_NUMBER, le=MAX_CONTEXT_NUMBER)]


class _Context(BaseModel):
    model_config = ConfigDict(extra="forbid")
    timestamp: Optional[datetime] = Field(
        None, description="the time the features are computed for (epoch seconds or ISO-8601; no zone: UTC; "
                          "default: now, flagged by time_outside_data when it lies outside the model's data); "
                          "not before the data starts, nor more than a day past the server's clock")


def context_model(columns: dict[str, str]) -> type[BaseModel]:
    """The request's ``context``: the dataset's declared context columns (``{name: "string" | "float"}``) and
    the request time, each typed and bounded; any other key is refused (400 naming it), so a request can never
    write over a user's or an item's features."""
    fields = {}
    for name, kind in columns.items():
        text = kind == "string"
        typed = ContextString if text else ContextNumber
        what = "text" if text else "a number"
        fields[name] = (Optional[typed], Field(None, description=f"declared context column ({what})"))
    fields.pop("timestamp", None)
    return create_model("Context", __base__=_Context,
                        __doc__="Request context: the dataset's declared context columns and the request time.",
                        **fields)


Context = context_model({"device": "string"})  # the contract's own context; the service builds its dataset's


TIME_OUTSIDE_DATA = ("the request time (context.timestamp, default now) lies more than the longest feature window "
                     "before the model's data starts or after it ends: time-derived features are held to the range "
                     "training saw, and the scores are the model's at the data's edge")
WARNINGS = "what the client should know about these scores, in words (empty when nothing)"


class RankedItem(BaseModel):
    item_id: str
    score: float = Field(description="fused score the list is ordered by (before diversity re-ranking)")
    scores: dict[str, float] = Field(description="each objective's probability")
    rank_before_rerank: int = Field(description="1-based position by fused score alone")
    cold_start: bool = Field(description="the online store has no features for this item; scored from defaults")


class RankResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    request_id: str = Field(description="this answer's id in the impression log: quote it in POST /feedback")
    feedback_token: str = Field(description="send it with POST /feedback on this answer: it proves the feedback "
                                            "comes from whom the answer was served to")
    model_version: str
    user_id: str
    user_cold_start: bool
    weights: dict[str, float] = Field(description="the weights this answer was fused with: the request's, else the "
                                                  "model's, or the vector exploration drew (MTLREC_EXPLORE)")
    fusion: str
    diversity: float
    novelty: float
    time_outside_data: bool = Field(False, description=TIME_OUTSIDE_DATA)
    warnings: list[str] = Field(default_factory=list, description=WARNINGS)
    items: list[RankedItem]


Token = Optional[Annotated[str, Field(max_length=128)]]
EventName = Annotated[str, Field(min_length=1, max_length=64)]
EventValue = Annotated[float, Field(allow_inf_nan=False)]
Events = Annotated[dict[EventName, EventValue], Field(min_length=1, max_length=32)]


class FeedbackResponse(BaseModel):
    request_id: str
    item_id: str
    recorded: list[str] = Field(description="events written now")
    duplicates: list[str] = Field(description="events this request and item already had (feedback is idempotent)")


class ScoredItem(BaseModel):
    item_id: str
    scores: dict[str, float]
    cold_start: bool


class ScoreResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    model_version: str
    user_id: str
    user_cold_start: bool
    time_outside_data: bool = Field(False, description=TIME_OUTSIDE_DATA)
    warnings: list[str] = Field(default_factory=list, description=WARNINGS)
    items: list[ScoredItem]


class ReloadResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    model_version: str
    fusion_version: str = Field(description="the fusion weights' version served: declared, or an accepted tuning's")
    previous: Optional[str]
    changed: bool = Field(description="whether the model or its fusion version changed")
