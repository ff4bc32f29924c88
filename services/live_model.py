"""The model a service worker serves, swapped whole when production moves.

A worker serves what the production pointer (``services/production_pointer.py``) names: its model and its
fusion weights' version. It loads them as it starts, and again on ``POST /admin/reload``, on SIGHUP (which
``services/server.py`` forwards to every worker) and, with ``MTLREC_RELOAD_POLL_S``, whenever the pointer moves:
``/admin/reload`` reaches only the worker that receives it, so each worker also follows the pointer by itself.
A swap replaces one reference, so a request in flight keeps the model object it started with; when only the
fusion version moved, the loaded scorer is kept and only its weights change.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from services import ranking

log = logging.getLogger("mtlrec.service")

_LIVE: list["LiveModel"] = []


def _on_hup(*_) -> None:
    """Reload every live model of this worker in a thread: the worker keeps answering while the model loads."""
    for live in list(_LIVE):
        threading.Thread(target=live.load_quietly, daemon=True, name="mtlrec-sighup").start()


try:  # at import, in the worker's main thread (a handler cannot be installed from another thread)
    signal.signal(signal.SIGHUP, _on_hup)
except ValueError:
    pass


class LiveModel:
    """``model``: what this worker serves now (None until a load succeeds); each request reads it once."""

    def __init__(self) -> None:
        self.model: Optional[ranking.Model] = None
        self._lock = threading.Lock()
        # Model loading for /admin/reload, off the thread that answers /rank.
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtlrec-reload")

    def load(self) -> tuple[Optional[str], str]:
        """Serve what the production pointer names now: its model and its fusion weights' version.

        Returns what was served before and what is served now, each as ``tag#fusion``.
        """
        from models.scoring.artifact import Scorer
        from services import model_store, production_pointer, registry_io

        with self._lock:
            live = production_pointer.serving()
            if live is None:
                raise LookupError(f"no production model in the registry at {registry_io.home()}")
            model = self.model
            previous = f"{model.tag}#{model.fusion}" if model else None
            if model is None or model.tag != live.tag:
                model = ranking.Model.of(live.tag, Scorer.load(model_store.artifact_path(live.tag)), live.weights,
                                         live.fusion)
            elif model.fusion != live.fusion:
                model = model.with_fusion(live.weights, live.fusion)
            if model is not self.model:
                self.model = model
                log.info("serving %s with fusion %s (was %s)", model.tag, model.fusion, previous)
            return previous, f"{model.tag}#{model.fusion}"

    async def reload(self) -> tuple[Optional[str], str]:
        """``load`` on an executor of its own: requests keep being answered while the model loads."""
        return await asyncio.get_running_loop().run_in_executor(self._loader, self.load)

    def load_quietly(self) -> None:
        try:
            self.load()
        except Exception as e:  # noqa: BLE001
            log.error("reload failed, keeping %s: %s", self.model.tag if self.model else None, e)

    def follow(self, every_s: float) -> None:
        """Reload whenever the production pointer names another model or fusion version, checked every ``every_s``."""
        threading.Thread(target=self._follow, args=(every_s,), daemon=True, name="mtlrec-reload").start()

    def _follow(self, every_s: float) -> None:
        from services import production_pointer

        while True:
            time.sleep(every_s)
            try:
                live = production_pointer.serving()
            except Exception:  # noqa: BLE001 - a torn read is retried on the next tick
                continue
            model = self.model
            if live and (model is None or (live.tag, live.fusion) != (model.tag, model.fusion)):
                self.load_quietly()

    def reload_on_sighup(self) -> None:
        """SIGHUP (forwarded to this worker by ``services.server``) reloads this model in place from now on."""
        _LIVE.append(self)
