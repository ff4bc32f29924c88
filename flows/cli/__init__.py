"""The `mtlrec` command line: one module per command group, mounted here.

Each command imports its stage only when it runs, so `mtlrec data synth` does
not pay for Great Expectations or Prefect start-up, and a command that fails
to import names the stage that broke.
"""

from __future__ import annotations

import typer

from flows.cli import data, events, features, fusion, fusion_evaluate, registry, serving, workflow

app = typer.Typer(help="mtlrec: multi-task recommendation, from raw events to a ranking API.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
app.add_typer(data.app, name="data")
app.add_typer(features.app, name="features")
app.add_typer(registry.app, name="models", help="The model registry: list, show, rollback.")
app.add_typer(events.app, name="events")
# `mtlrec fusion tune` (offline, fusion.py) and `mtlrec fusion evaluate` (off-policy, fusion_evaluate.py): one group
fusion.app.registered_commands.extend(fusion_evaluate.app.registered_commands)
app.add_typer(fusion.app, name="fusion")
for group in (workflow.app, serving.app, registry.commands):
    app.registered_commands.extend(group.registered_commands)


def main() -> None:
    """Every failure is one line on stderr naming the problem, and a non-zero exit (MTLREC_DEBUG=1: traceback)."""
    import sys

    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # the command line's one place to turn failures into a sentence (re-raised under DEBUG)
        if _debug():
            raise
        typer.echo(f"error: {describe_error(exc)}", err=True)
        sys.exit(1)


def _debug() -> bool:
    """MTLREC_DEBUG; a settings error (which may be the failure being reported) counts as off."""
    from models.settings import SettingsError, get_settings

    try:
        return get_settings().debug
    except SettingsError:
        return False


def describe_error(exc: BaseException) -> str:
    """The problem in one line: our own errors already name the fix; others get their type for a search."""
    from services.registry_io import RegistryError
    from models.config import ConfigError
    from models.contract.tables import ManifestError
    from models.contract.declaration import DeclarationError
    from models.settings import SettingsError
    from flows.dev.launcher import NotServable

    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (RegistryError, ConfigError, ManifestError, DeclarationError, FileNotFoundError, NotServable,
                        SettingsError)):
        return text
    return f"{type(exc).__name__}: {text} (run with MTLREC_DEBUG=1 for the traceback)"
