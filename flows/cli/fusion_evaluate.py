"""`mtlrec fusion evaluate`: what another fusion weighting would have earned, estimated from the service's log.

The service must have explored (``MTLREC_EXPLORE=epsilon``) for any weighting but the one it served to be
judged: ``models.decisions.offpolicy`` explains the estimators, which requests count for a weighting, and the evidence
below which it refuses to estimate.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from models.decisions.offpolicy_estimators import MIN_ESS, MIN_MATCHING, MIN_REWARDED

app = typer.Typer(help="Fusion weightings judged on logged traffic.", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Fusion weightings judged on logged traffic."""


def _json_weights(value: str | None, option: str) -> dict[str, float] | None:
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise typer.BadParameter(f"not JSON: {e}", param_hint=option) from None
    if not isinstance(parsed, dict) or not parsed or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in parsed.values()):
        raise typer.BadParameter('a JSON object of numbers keyed by task: \'{"<task>": 1, ...}\'', param_hint=option)
    return {str(k): float(v) for k, v in parsed.items()}


def default_rewards(data: Path) -> dict[str, float]:
    """Each task's declared ``reward``, else its ``gain``, else 1 for a binary task (others earn nothing)."""
    from models.contract.tables import Manifest

    manifest = Manifest.load(data)
    out: dict[str, float] = {}
    for task in (manifest.tasks if manifest else []):
        if task.get("reward") is not None:
            out[task["name"]] = float(task["reward"])
        elif task.get("gain") is not None:
            out[task["name"]] = float(task["gain"])
        elif task.get("type", "binary") == "binary":
            out[task["name"]] = 1.0
    return out


@app.command("evaluate")
def evaluate(
    weights: str = typer.Option(..., help='the weighting to judge, JSON by task: \'{"<task>": 1, "<other>": 3}\' '
                                          "(one the service explored or served; normalised to sum 1)"),
    data: Path = typer.Option(Path("data/synth"), help="the dataset the service served from: its task declaration "
                                                       "gives the default rewards"),
    rewards: str = typer.Option(None, help='reward per event, JSON by task: \'{"<task>": 1, ...}\' (default: each '
                                           "task's declared reward, else its gain, else 1 for a binary task)"),
    since: str = typer.Option(None, help="only requests at or after this time (ISO-8601 or epoch seconds)"),
    url: str = typer.Option(None, help="event database (default $MTLREC_EVENTS_URL, else <data>/_events)"),
    min_matching: int = typer.Option(MIN_MATCHING, min=2, help="requests one logging policy must have ranked with "
                                                               "the weighting for its requests to count"),
    min_rewarded: int = typer.Option(MIN_REWARDED, min=1, help="of those, how many must have earned a reward"),
    min_ess: float = typer.Option(MIN_ESS, min=0.0, help="effective sample size of the importance weights the "
                                                         "requests used must reach"),
) -> None:
    """IPS, self-normalised IPS and doubly robust estimates, with 95% intervals, of a weighting's reward per request.

    Refused (exit 2, the reason and the figures on stderr) where the log cannot back an estimate; the refusal
    lists the weightings it can judge, printed so that pasting one back as --weights matches it.
    """
    from flows.cli.events import _since, _store
    from models.decisions.exploration_log import format_weights, logged_requests
    from models.decisions.offpolicy import evaluate_weighting

    target = _json_weights(weights, "--weights")
    reward_of = _json_weights(rewards, "--rewards") or default_rewards(data)
    store = _store(data, url)
    impressions, feedback = store.read(_since(since))
    if impressions.empty:
        raise typer.BadParameter(f"no impressions in {store.where()}" + (f" since {since}" if since else ""),
                                 param_hint="--since" if since else "--url")
    requests = logged_requests(impressions, feedback)
    try:
        result = evaluate_weighting(requests, target, reward_of, min_matching=min_matching,
                                    min_rewarded=min_rewarded, min_ess=min_ess)
    except ValueError as e:  # Refused, or a policy record that contradicts itself
        typer.echo(f"{store.where()}: refused: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{store.where()}: {len(requests):,} requests, {result.requests:,} used; rewards "
               + ", ".join(f"{k}={v:g}" for k, v in reward_of.items()))
    typer.echo("  used, by fusion version / exploration: "
               + "; ".join(f"{fusion} / {explore}: {n:,}" for (fusion, explore), n in result.used.items()))
    if result.left_out:
        typer.echo("  left out: " + "; ".join(f"{n:,} {why}" for why, n in result.left_out.items()))
    typer.echo(f"target {format_weights(result.target)}: {result.matching:,} requests ranked with it "
               f"({result.rewarded:,} rewarded), ESS {result.ess:.1f}; reward per request, 95% interval")
    typer.echo(f"  IPS     {result.ips}")
    typer.echo(f"  SNIPS   {result.snips}")
    typer.echo(f"  DR      {result.dr}" if result.dr else f"  DR      not available: {result.dr_missing}")
    typer.echo(f"  logged  {result.logged}  (what the logging policy earned on the requests used)")
