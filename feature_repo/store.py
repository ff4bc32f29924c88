"""One Feast store per dataset: where it lives (``StoreSettings``) and opening it (``open_store``).

The workspace of a dataset lives in ``<dataset>/_features/``: the computed
source tables, the registry, the SQLite online store and the training set.
Which online store serves is configuration: ``online="redis"`` (or the
environment variable ``MTLREC_ONLINE_STORE=redis`` with ``MTLREC_REDIS``,
default ``127.0.0.1:6379,db=0``; ``models.settings``) selects Redis; nothing in
code changes.

What is done with an open store lives beside this module: ``apply.py``
registers the definitions, ``materialize.py`` loads the online store,
``online_status.py`` says what it holds, ``training_set.py`` makes the
point-in-time training set and ``build.py`` runs all of it;
``registry_file.py`` reads the registry file without Feast.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from models.settings import get_settings

WORKSPACE = "_features"
ENGINES = ("duckdb", "spark")
TRAINING_FILE = "training.parquet"


@dataclass(frozen=True)
class StoreSettings:
    """Where a dataset's store lives and which online store it serves from."""

    dataset: Path
    workspace: Path
    online: str = "sqlite"  # or "redis"
    redis: str = "127.0.0.1:6379,db=0"
    project: str = "mtlrec"
    # Feast's offline store and compute engine: duckdb (embedded; Feast's file store, dask, drops unmatched
    # rows; see benchmarks/README.md) or spark (feature_repo/engines.py).
    offline: str = "duckdb"
    spark_master: str = "local[2]"
    spark_conf: tuple[tuple[str, str], ...] = ()  # hashable: settings are frozen

    @classmethod
    def for_dataset(cls, dataset: Path | str, *, workspace: Path | str | None = None, online: str | None = None,
                    redis: str | None = None, project: str | None = None,
                    offline: str | None = None) -> "StoreSettings":
        """Arguments win; what they leave out comes from the environment as it is now (``models.settings``)."""
        env = get_settings()
        dataset = Path(dataset).resolve()
        online = (online or env.online_store).lower()
        if online not in ("sqlite", "redis"):
            raise ValueError(f"online store must be 'sqlite' or 'redis', not {online!r}")
        if online == "redis" and importlib.util.find_spec("redis") is None:
            raise ValueError("the redis online store needs the redis client: pip install 'mtlrec[redis]'")
        offline = (offline or env.offline_engine).lower()
        if offline not in ENGINES:
            raise ValueError(f"offline engine must be one of {ENGINES}, not {offline!r}")
        return cls(dataset=dataset, workspace=Path(workspace).resolve() if workspace else dataset / WORKSPACE,
                   online=online, redis=redis or env.redis, project=project or env.feast_project,
                   offline=offline, spark_master=env.spark_master, spark_conf=tuple(sorted(env.spark_conf.items())))

    @property
    def tables(self) -> Path:
        return self.workspace / "tables"

    @property
    def training_file(self) -> Path:
        return self.workspace / TRAINING_FILE

    @property
    def store_id(self) -> str:
        """Which online store this is: ``sqlite``, or ``redis-<host>-<port>-db<n>``.

        Each online store keeps its own Feast registry (``registry_file``): Feast records in the registry up
        to when each view was materialised, and a registry shared by SQLite and Redis would tell a fresh
        Redis that it already holds everything SQLite was given.
        """
        if self.online == "sqlite":
            return "sqlite"
        parts = self.redis.split(",")
        host, _, port = parts[0].partition(":")
        db = next((p.split("=", 1)[1] for p in parts[1:] if p.startswith("db=")), "0")
        return re.sub(r"[^A-Za-z0-9_.-]", "_", f"redis-{host}-{port or 6379}-db{db}")

    @property
    def registry_file(self) -> Path:
        return self.workspace / ("registry.db" if self.online == "sqlite" else f"registry-{self.store_id}.db")

    def yaml_config(self, registry: Path | None = None) -> dict:
        online = ({"type": "sqlite", "path": str(self.workspace / "online.db")} if self.online == "sqlite"
                  else {"type": "redis", "connection_string": self.redis})
        from feature_repo.engines import engine_config

        return {"project": self.project, "provider": "local", "registry": str(registry or self.registry_file),
                "online_store": online, **engine_config(self), "entity_key_serialization_version": 3}


def open_store(settings: StoreSettings, *, serving: bool = False):
    """A FeatureStore on this dataset's workspace (the yaml is written there, for the `feast` CLI too).

    ``serving``: the service needs the feature definitions, not the bookkeeping of materialisation; an online
    store never materialised into has no registry of its own yet, so it reads the definitions from the
    dataset's main registry (and then reports itself not ready: it holds no rows). It reads online rows only,
    so it runs on the embedded offline engine whatever the pipeline's is: a bento ships without pyspark, and
    Feast reads the registry's SparkSources without it.
    """
    os.environ.setdefault("FEAST_USAGE", "False")
    from feast import FeatureStore

    from feature_repo.engines import check_available

    offline_engine = settings.offline
    if serving:
        settings = replace(settings, offline=ENGINES[0])
    check_available(settings.offline)

    settings.workspace.mkdir(parents=True, exist_ok=True)
    registry = serving_registry(settings) if serving else settings.registry_file
    name = "feature_store.yaml" if settings.online == "sqlite" else f"feature_store.{settings.store_id}.yaml"
    if registry != settings.registry_file or settings.offline != offline_engine:
        name = f"feature_store.{settings.store_id}.serving.yaml"
    path = settings.workspace / name
    text = yaml.safe_dump(settings.yaml_config(registry), sort_keys=False)
    if not path.is_file() or path.read_text() != text:  # serving workers open it at once: replace, never truncate
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return FeatureStore(repo_path=str(settings.workspace), fs_yaml_file=path)


def serving_registry(settings: StoreSettings) -> Path:
    """The registry the service reads: this online store's own, or the dataset's main one before the first
    materialisation into it (see ``open_store``)."""
    registry = settings.registry_file
    return registry if registry.is_file() else settings.workspace / "registry.db"
