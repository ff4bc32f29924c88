"""The event that starts a pipeline run when a dataset lands: ``mtlrec.data.landed``.

The ``local`` deployment in ``prefect.yaml`` has a trigger that expects this
event from any ``mtlrec.dataset.*`` resource and passes ``payload.data`` as
the run's ``data`` parameter. Whatever writes a dataset (a sync job, a
notebook, ``mtlrec data landed DIR``) emits it; nothing polls for files.
"""

from __future__ import annotations

from pathlib import Path

EVENT = "mtlrec.data.landed"


def emit_data_landed(directory: Path | str):
    """Emit the event to the server at PREFECT_API_URL and wait until it is sent; returns the Event.

    Refuses without a reachable server: Prefect would otherwise send it to a
    temporary server of this process, where no deployment listens.
    """
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL

    from flows.dev.prefect_server import healthy

    path = Path(directory).resolve()
    if not path.is_dir():
        raise RuntimeError(f"{path} is not a directory")
    url = PREFECT_API_URL.value()
    if not url:
        raise RuntimeError("PREFECT_API_URL is not set: point it at the Prefect server that holds the "
                           "mtl-pipeline deployment (e.g. http://127.0.0.1:4200/api)")
    if not healthy(url):
        raise RuntimeError(f"no Prefect server answers at {url}")
    event = emit_event(event=EVENT, resource={"prefect.resource.id": f"mtlrec.dataset.{path.name}",
                                              "prefect.resource.name": path.name},
                       payload={"data": str(path)})
    EventsWorker.drain_all(timeout=30, at_exit=False)  # a CLI exits right after; the event must be out first
    if event is None:
        raise RuntimeError(f"Prefect did not emit the event (PREFECT_API_URL={url})")
    return event
