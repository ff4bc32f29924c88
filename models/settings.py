"""Every ``MTLREC_*`` environment variable, typed, with its default and what it is for: one place.

``get_settings()`` reads the environment *now* (nothing is cached at import), so a variable set by a test's
``monkeypatch`` or by ``mtlrec serve`` for its child is seen by the next read. Who reads it when is the
caller's choice and is kept as it was: the service reads its bounds when its module is imported (they shape
the OpenAPI schema and the middleware) and its store settings when a worker starts; ``StoreSettings.for_dataset``,
the registry's and the gate's fault hooks and the admin token are read on every call. ``mtlrec settings`` lists
every variable with its current value; the table in ``docs/configuration.md`` is ``markdown_table()``.

A value that does not parse is an error naming the variable (``SettingsError``), raised by whichever read
comes first; an empty variable counts as unset. Unknown ``MTLREC_*`` names are ignored (``unknown()`` lists
them, and ``mtlrec settings`` shows them, since they are most likely typos).

Why this module is in ``models/``: the variables are read by ``flows/`` (the command line, the feature store,
the registry, the gate), by ``services/`` (the ranking service) and by ``feature_repo/``
(``MTLREC_FEATURE_TABLES``, read by ``feast apply`` in that directory). Imports point
flows -> services -> feature_repo -> models, so the one layer all three may import is ``models/``. No
``models/`` module reads a variable or imports this one: ``models.training.train`` still runs on a GPU machine with
only torch, Lightning, numpy, pandas, pyarrow and PyYAML, without pydantic-settings (a test checks that no
other ``models/`` module imports it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PREFIX = "MTLREC_"
ROOT = Path(__file__).resolve().parents[1]


class SettingsError(ValueError):
    """An ``MTLREC_*`` variable whose value does not parse; the message names the variable and the reason."""


class Settings(BaseSettings):
    """The ``MTLREC_*`` environment: field ``workers`` is the variable ``MTLREC_WORKERS``, and so on."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, env_ignore_empty=True, extra="ignore",
                                      validate_default=True)

    # ---- the feature store ------------------------------------------------------------------------------------
    online_store: Literal["sqlite", "redis"] = Field(
        "sqlite", description="Which Feast online store `mtlrec features`, the pipeline and the service use: "
                              "sqlite (one file, one machine) or redis (shared by every service replica). "
                              "A command's --online wins over it.")
    redis: str = Field(
        "127.0.0.1:6379,db=0", description="The Redis online store's connection string (host:port,db=N[,password=...]) "
                                           "when the online store is redis.")
    feast_project: str = Field(
        "mtlrec", description="The Feast project name in each dataset's registry; tests use their own so that "
                              "several stores can share one Redis.")
    offline_engine: Literal["duckdb", "spark"] = Field(
        "duckdb", description="Feast's offline store and compute engine: duckdb (embedded, one machine) or spark "
                              "(Feast's Spark offline store and Spark compute engine: the views' sources become "
                              "SparkSources and Spark does the historical retrieval and the materialisation).")
    spark_master: str = Field(
        "local[2]", description="The Spark master the spark engine uses: local[N] on this machine, or a cluster's "
                                "URL (spark://host:7077, yarn, k8s://...).")
    spark_conf: dict[str, str] = Field(
        {}, description='More Spark properties for the spark engine, as JSON (e.g. '
                        '{"spark.executor.memory": "8g"}); they win over the defaults.')
    training_join: Literal["auto", "asof", "feast"] = Field(
        "auto", description="How the training set's point-in-time join runs: asof (DuckDB ASOF JOINs over the "
                            "Feast views' sources, feature_repo/asof.py: the same rows, about 4x faster), "
                            "feast (Feast's get_historical_features on the offline engine), or auto: asof on "
                            "duckdb, feast on spark.")
    feature_engine: Literal["auto", "numpy", "duckdb", "spark"] = Field(
        "auto", description="What computes the windowed aggregate tables: numpy (dense entities x days arrays, "
                            "about 3x faster while they fit), duckdb (SQL, feature_repo/compute_sql.py: the same "
                            "tables in bounded memory, spilling to disk), spark (the same SQL on "
                            "MTLREC_SPARK_MASTER), or auto: spark when MTLREC_OFFLINE_ENGINE is spark, numpy "
                            "while its arrays take at most a quarter of the memory, duckdb beyond.")
    duckdb_memory_limit: str = Field(
        "", description="DuckDB's memory limit for the feature stage's queries (e.g. 4GB); beyond it they spill "
                        "to <dataset>/_features/duckdb_tmp. Empty: half of this machine's memory (DuckDB's own "
                        "80% left too little for the rest of the process at 100M impressions).")
    feature_tables: Path = Field(
        ROOT / "data" / "synth" / "_features" / "tables",
        description="Where `feast apply` run inside feature_repo/ finds the feature tables and their schema.json; "
                    "the pipeline passes each dataset's tables itself.")

    # ---- data validation ---------------------------------------------------------------------------------------
    validation_chunk_rows: int = Field(
        2_000_000, gt=0, description="Data validation (mtlrec validate, the pipeline's validate stage) reads a "
                                     "table with more rows than this in chunks of this many rows: memory is bounded "
                                     "by a chunk, not the table, and the rules and the report are the same.")

    # ---- the ranking service ----------------------------------------------------------------------------------
    dataset: Path = Field(
        Path("data/synth"), description="The dataset whose _features/ holds the Feast store the service reads "
                                        "(mtlrec serve --data sets it).")
    workers: int = Field(
        1, ge=1, description="Service worker processes (mtlrec serve --workers sets it); scale out with workers, "
                             "one per core, rather than torch threads.")
    reload_poll_s: Optional[float] = Field(
        None, ge=0, description="Seconds between each worker's checks of the production pointer, loading a newly "
                                "promoted model by itself (POST /admin/reload reaches one worker only); 0 never "
                                "checks.",
        json_schema_extra={"default_shown": "2 with several workers, else 0"})
    torch_threads: int = Field(
        1, ge=1, description="Torch intra-op threads per worker: one request's forward pass is small, and more "
                             "threads only contend with the other requests.")
    max_candidates: int = Field(
        1000, ge=1, description="The most candidates (and the largest k) one request may send; fixed when the "
                                "service starts, since it shapes the OpenAPI schema.")
    max_body_bytes: int = Field(
        1 << 20, gt=0, description="Request bodies larger than this are refused with 413 before they are parsed.")
    header_timeout_s: float = Field(
        10.0, gt=0, description="A connection that sends no complete request head within this many seconds is "
                                "closed (slow clients cannot hold workers).")
    keepalive_timeout_s: int = Field(
        5, ge=0, description="An idle keep-alive connection is closed after this many seconds.")
    keepalive_requests: Optional[int] = Field(
        None, ge=0, description="A keep-alive connection is closed after this many requests, so pooled clients "
                                "spread over the workers instead of piling onto the one that accepted first; 0 "
                                "never closes.",
        json_schema_extra={"default_shown": "16 with several workers, else 0"})
    access_log: bool = Field(
        True, description="BentoML's per-request access log; off (0) saves about a fifth of the CPU a "
                          "100-candidate request costs. Metrics and error logs stay on.")
    store_connect_timeout_ms: float = Field(
        100.0, gt=0, description="Redis connect timeout of the served path (no client retries): a store outage "
                                 "must cost a request milliseconds.")
    store_read_timeout_ms: float = Field(
        250.0, gt=0, description="Redis read timeout of the served path (no client retries).")
    store_cooldown_ms: float = Field(
        1000.0, ge=0, description="How long the online store's circuit breaker stays open (requests answer 503 at "
                                  "once) before one request probes the store again.")
    admin_token: SecretStr = Field(
        SecretStr(""), description="The token POST /admin/reload requires (header X-Admin-Token or Authorization: "
                                   "Bearer); unset disables reloading over HTTP. SIGHUP always reloads.")

    # ---- the impression log ----------------------------------------------------------------------------------
    events_url: str = Field(
        "", description="Where the service logs every impression it returns and the feedback on it: a "
                        "postgresql:// URL, sqlite:///path/events.db, or off. `mtlrec events export` reads it.",
        json_schema_extra={"default_shown": "an SQLite file, `<dataset>/_events/events.db`"})
    events_queue_rows: int = Field(
        20000, ge=1, description="Impression rows waiting to be written; beyond this they are dropped and counted "
                                 "(mtlrec_event_drops_total on /metrics), never a ranking request slowed or failed.")
    events_timeout_ms: float = Field(
        2000.0, gt=0, description="How long one event-database operation may wait (connecting, SQLite's lock): "
                                  "the writer drops its batch and opens its breaker, feedback answers 503.")
    events_retention_days: float = Field(
        90.0, ge=0, description="The service deletes logged requests, their feedback and quarantined rows older "
                                "than this (by the server's clock), hourly; 0 keeps everything. `mtlrec events "
                                "prune --before T` does it by hand.")
    events_memory_mb: int = Field(
        64, ge=1, description="Memory per worker for its recent answers (feedback checks them without a database "
                              "read) and, half as much again, for users' recent positive feedback (novelty).")
    feedback_secret: SecretStr = Field(
        SecretStr(""), description="The secret /rank signs each answer's feedback_token with and /feedback checks "
                                   "it against; unset: one generated once in $BENTOML_HOME/mtlrec/feedback.secret, "
                                   "shared by every replica of the model store.")
    feedback_wait_ms: float = Field(
        2000.0, ge=0, description="How long /feedback waits for the writer to log the answer it labels (whichever "
                                  "worker gave it); an answer whose rows were dropped is a 409 at once, one still "
                                  "not logged after the wait a 503 (this worker's) or a 409 (another's).")

    explore: Literal["off", "epsilon"] = Field(
        "off", description="The service's exploration policy for /rank requests that send no weights: off ranks with "
                           "the model's fusion weights; epsilon picks one of a few nearby weight vectors at random "
                           "and logs each placement's propensity, so `mtlrec fusion evaluate` can estimate another "
                           "weighting's reward from the log. A caller's explicit weights are never explored.")
    explore_epsilon: float = Field(
        0.1, ge=0, le=1, description="With MTLREC_EXPLORE=epsilon, the share of requests ranked with a vector drawn "
                                     "uniformly from all of them (the default's included): each other vector is "
                                     "used with probability epsilon/|vectors|.")
    explore_spread: float = Field(
        0.5, gt=0, lt=1, description="How far the explored weight vectors lie from the default: each multiplies one "
                                     "objective's weight by 1+spread or 1-spread (2 per objective, plus the "
                                     "default).")

    # ---- the command line -------------------------------------------------------------------------------------
    debug: bool = Field(
        False, description="mtlrec prints the full traceback of a failure instead of one line.")

    # ---- fault injection and tests ----------------------------------------------------------------------------
    registry_crash_before_replace: bool = Field(
        False, description="Fault injection (tests): every atomic registry write exits the process (code 70) "
                           "after its temporary file is synced and before it replaces the real one.")
    gate_pause_s: float = Field(
        0.0, ge=0, description="Fault injection (tests): seconds the gate sleeps between judging a model and "
                               "committing its decision, to widen the race with a concurrent promotion.")
    skip_clean_check: bool = Field(
        False, description="Tests: turn off the check that a pytest session leaves the checkout as it found it "
                           "(for runs while you edit).")

    @field_validator("online_store", "explore", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _derived_defaults(self) -> "Settings":
        if self.explore == "epsilon" and not self.explore_epsilon > 0:
            raise ValueError("MTLREC_EXPLORE=epsilon needs MTLREC_EXPLORE_EPSILON above 0: with 0 nothing is "
                             "explored, and the log can judge no other weighting")
        several = self.workers > 1
        if self.reload_poll_s is None:
            self.reload_poll_s = 2.0 if several else 0.0
        if self.keepalive_requests is None:
            self.keepalive_requests = 16 if several else 0
        return self


def env_name(field: str) -> str:
    """The variable of a field: ``workers`` -> ``MTLREC_WORKERS``."""
    return PREFIX + field.upper()


def names() -> list[str]:
    """Every variable, in declaration order."""
    return [env_name(f) for f in Settings.model_fields]


def get_settings() -> Settings:
    """The settings as the environment holds them now; SettingsError names each variable that does not parse."""
    try:
        return Settings()
    except ValidationError as e:
        raise SettingsError("; ".join(_describe(err) for err in e.errors())) from None


def _describe(err: dict) -> str:
    field = str(err["loc"][0]) if err.get("loc") else ""
    if field not in Settings.model_fields:  # a whole-model check: no single variable to blame
        return err["msg"]
    shown = "" if field in ("admin_token", "feedback_secret") else f"={err.get('input')!r}"
    return f"{env_name(field)}{shown}: {err['msg']}"


def unknown(environ: dict[str, str] | None = None) -> list[str]:
    """``MTLREC_*`` names in the environment that are no setting (ignored: most likely typos)."""
    known = set(names())
    return sorted(k for k in (os.environ if environ is None else environ)
                  if k.upper().startswith(PREFIX) and k.upper() not in known)


def _shown(value: Any) -> str:
    if isinstance(value, SecretStr):
        return "(set)" if value.get_secret_value() else "(unset)"
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def describe(settings: Settings | None = None) -> list[dict[str, str]]:
    """Per variable: its name, current value (a secret only as set/unset), default (markdown) and description."""
    settings = settings or get_settings()
    rows = []
    for field, info in Settings.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        default = _shown(info.default)
        if isinstance(info.default, Path) and info.default.is_relative_to(ROOT):
            default = f"<checkout>/{info.default.relative_to(ROOT)}"  # shown the same in every checkout
        if not isinstance(info.default, SecretStr):
            default = f"`{default}`"
        default = extra.get("default_shown", default)  # a default that depends on another variable, in words
        rows.append({"name": env_name(field), "value": _shown(getattr(settings, field)), "default": default,
                     "description": info.description or ""})
    return rows


def markdown_table() -> str:
    """The table of every variable in docs/configuration.md: name, default, description (no current values)."""
    lines = ["| Variable | Default | What it does |", "|---|---|---|"]
    for row in describe(Settings.model_construct()):
        lines.append(f"| `{row['name']}` | {row['default']} | {row['description']} |")
    return "\n".join(lines) + "\n"


__all__ = ["Settings", "SettingsError", "get_settings", "env_name", "names", "unknown", "describe",
           "markdown_table", "PREFIX"]
