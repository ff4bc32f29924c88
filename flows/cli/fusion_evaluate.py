"""`mtlrec fusion evaluate`: what another fusion weighting would have earned, estimated from the service's log.

The service must have explored (``MTLREC_EXPLORE=epsilon``) for any weighting but the one it served to be
judged: ``models.offpolicy`` explains the estimators, and refuses a weighting the log never drew.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

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
    from models.contract import Manifest

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


def logged_requests(impressions, feedback, rewards: dict[str, float]):
    """Per request: its list's reward, the vector that ranked it, that draw's probability and the policy's support.

    Only explored requests count when there are any: a request whose caller sent its own weights (or that was
    served with exploration off) was not drawn by the policy being evaluated. A log without exploration is
    judged as the deterministic policy it was (each request's weights drawn with probability 1).
    """
    import pandas as pd

    requests = impressions.drop_duplicates("request_id").set_index("request_id")
    explored = requests["policy"].map(bool)
    skipped = 0
    if explored.any():
        skipped = int((~explored).sum())
        requests = requests[explored]
    per_item = (feedback.assign(reward=feedback["event"].map(rewards).fillna(0.0) * feedback["value"])
                .groupby("request_id")["reward"].sum() if len(feedback) else pd.Series(dtype=float))
    reward = per_item.reindex(requests.index).fillna(0.0).to_numpy()
    chosen, probability, vectors = [], [], []
    for weights, policy in zip(requests["weights"], requests["policy"]):
        if policy:
            chosen.append(policy["vectors"][policy["chosen"]])
            probability.append(policy["probabilities"][policy["chosen"]])
            vectors.extend(policy["vectors"])
        else:
            chosen.append(weights)
            probability.append(1.0)
    return reward, chosen, probability, vectors, skipped


@app.command("evaluate")
def evaluate(
    weights: str = typer.Option(..., help='the weighting to judge, JSON by task: \'{"<task>": 1, "<other>": 3}\' '
                                          "(one the service explored; normalised to sum 1)"),
    data: Path = typer.Option(Path("data/synth"), help="the dataset the service served from: its task declaration "
                                                       "gives the default rewards"),
    rewards: str = typer.Option(None, help='reward per event, JSON by task: \'{"<task>": 1, ...}\' (default: each '
                                           "task's declared reward, else its gain, else 1 for a binary task)"),
    since: str = typer.Option(None, help="only requests at or after this time (ISO-8601 or epoch seconds)"),
    url: str = typer.Option(None, help="event database (default $MTLREC_EVENTS_URL, else <data>/_events)"),
) -> None:
    """IPS and self-normalised IPS estimates, with 95% intervals, of a weighting's reward per request."""
    from flows.cli.events import _since, _store
    from models.offpolicy import evaluate as estimate

    target = _json_weights(weights, "--weights")
    reward_of = _json_weights(rewards, "--rewards") or default_rewards(data)
    store = _store(data, url)
    impressions, feedback = store.read(_since(since))
    if impressions.empty:
        raise typer.BadParameter(f"no impressions in {store.where()}" + (f" since {since}" if since else ""),
                                 param_hint="--since" if since else "--url")
    reward, chosen, probability, vectors, skipped = logged_requests(impressions, feedback, reward_of)
    try:
        result = estimate(reward, chosen, probability, target, logged_vectors=vectors)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--weights") from None
    typer.echo(f"{store.where()}: {result.requests:,} requests"
               + (f" ({skipped:,} not explored, left out)" if skipped else "")
               + f", {result.matching:,} ranked with the target; rewards "
               + ", ".join(f"{k}={v:g}" for k, v in reward_of.items()))
    typer.echo(f"target {json.dumps(result.target)}: reward per request, 95% interval")
    typer.echo(f"  IPS     {result.ips}")
    typer.echo(f"  SNIPS   {result.snips}")
    typer.echo(f"  logged  {result.logged}  (what the logging policy earned)")
