"""What a dataset's Feast registry file holds, read without importing Feast: the feature store half of
``mtlrec serve``'s precondition (``flows/dev/launcher.py``).

The file is Feast's ``Registry`` protobuf message; it is parsed by Feast's own
generated class (``feast.protos.feast.core.Registry_pb2``), loaded on its own
(``_feast_proto``) so that the check stays light.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

from feature_repo.schema import FEATURE_SERVICE
from feature_repo.store import StoreSettings, serving_registry


class StoreNotBuilt(FileNotFoundError):
    """The dataset has no feature store, or its store lacks the feature service; the message names the fix."""


def check_servable(settings: StoreSettings, shown: Path | str | None = None) -> Path:
    """Raise StoreNotBuilt unless the registry the service would read holds the feature service; return it.

    Reads the registry file without Feast (``feature_services``), so that ``mtlrec serve`` refuses at once.
    ``shown``: the dataset as the user wrote it, for the message.
    """
    shown = str(shown if shown is not None else settings.dataset)
    fix = f"build it with `mtlrec features build {shown}`"
    registry = serving_registry(settings)
    if not registry.is_file():
        raise StoreNotBuilt(f"no feature store for {shown} (no Feast registry at {registry}): {fix}")
    try:
        services = feature_services(registry, settings.project)
    except (OSError, ValueError) as e:
        raise StoreNotBuilt(f"the Feast registry {registry} of {shown} cannot be read ({e}): re{fix}") from None
    if FEATURE_SERVICE not in services:
        raise StoreNotBuilt(f"the feature store of {shown} has no feature service {FEATURE_SERVICE!r} in project "
                            f"{settings.project!r} (registry {registry}): {fix}")
    return registry


def feature_services(registry: Path | str, project: str) -> list[str]:
    """The names of the feature services a Feast file registry holds for ``project``, in the registry's order.

    Raises ValueError when the file is not a registry; tests compare this with Feast's ``list_feature_services``.
    """
    from google.protobuf.message import DecodeError

    # Feast's own message class without Feast itself: the serve precondition must stay light (``_feast_proto``).
    message = _feast_proto("feast.core.Registry_pb2").Registry()
    try:
        message.ParseFromString(Path(registry).read_bytes())
    except DecodeError as e:
        raise ValueError(f"not a Feast registry: {e}") from None
    return [s.spec.name for s in message.feature_services if s.spec.project == project and s.spec.name]


def _feast_proto(name: str):
    """The module ``feast.protos.<name>``, Feast's generated protobuf code, imported without ``feast/__init__``.

    That package's ``__init__`` imports all of Feast; the generated modules under ``feast.protos`` need only
    ``google.protobuf`` and each other. In a process that has not imported Feast, ``feast`` stands in as a bare
    package (its directory, no ``__init__``) while they load, then is taken out of ``sys.modules``: a later
    ``import feast`` runs Feast's ``__init__`` as usual and finds these modules already loaded. Not for a
    thread that races another thread's first ``import feast``: its callers are the CLI's preflight and tests.
    """
    full = f"feast.protos.{name}"
    if full in sys.modules or "feast" in sys.modules:
        return importlib.import_module(full)
    spec = importlib.util.find_spec("feast")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("Feast is not installed")
    bare = importlib.util.module_from_spec(importlib.machinery.ModuleSpec("feast", None, is_package=True))
    bare.__path__ = list(spec.submodule_search_locations)
    sys.modules["feast"] = bare
    try:
        return importlib.import_module(full)
    finally:
        if sys.modules.get("feast") is bare:
            del sys.modules["feast"]
