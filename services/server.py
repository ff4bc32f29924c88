"""``bentoml serve``, with SIGHUP made a hot swap: ``python -m services.server serve services.service:RankingService``.

BentoML runs its workers under a circus arbiter, and the arbiter answers
SIGHUP by restarting every worker: seconds during which the listening socket
accepts but nobody answers. Here the arbiter forwards SIGHUP to its workers
instead; each worker's handler (``services.live_model``) loads the model
production now points to and swaps one reference, while it keeps serving.
``mtlrec serve`` execs this module, so SIGHUP sent to the process it started
reaches the arbiter.
"""

from __future__ import annotations

import os
import signal
import sys

WORKER_MODULE = "_bentoml_impl.worker.service"


def forward_hup() -> bool:
    """Replace circus' SIGHUP handling (reload = restart the workers) with forwarding SIGHUP to the workers."""
    try:
        from circus.sighandler import SysHandler
    except ImportError:  # pragma: no cover - BentoML without circus: nothing to change
        return False

    def handle_hup(self) -> None:
        import psutil

        for child in psutil.Process(os.getpid()).children(recursive=True):
            try:
                if WORKER_MODULE in " ".join(child.cmdline()):
                    child.send_signal(signal.SIGHUP)
            except psutil.Error:  # a worker that just exited
                continue

    SysHandler.handle_hup = handle_hup
    return True


def main() -> None:
    forward_hup()
    from bentoml_cli.cli import cli

    sys.argv[0] = "bentoml"
    cli()


if __name__ == "__main__":
    main()
