"""Off-policy evaluation of a fusion weighting from the service's exploration log: the questions asked of it.

Why: an A/B test of every candidate weighting costs traffic and weeks. When
the service explores (``MTLREC_EXPLORE=epsilon``) each request's list was
ranked by a weight vector drawn with a known probability, so the reward a
*different* choice would have earned can be estimated from the same log.

Three modules, read in this order:

- ``models/decisions/exploration_log.py``: the request table built from the
  event log, and which requests count for a target weighting (its support);
- ``models/decisions/offpolicy_estimators.py``: IPS, SNIPS and DR, their 95%
  intervals, and the evidence an estimate needs (``MIN_MATCHING``,
  ``MIN_REWARDED``, ``MIN_ESS``);
- this one: ``evaluate_weighting`` (one weighting's reward per request),
  ``judgeable`` (the weightings the log can judge) and ``compare`` (a
  proposal against the current weighting on the requests that judge both).

The minimums come from the simulator in ``tests/models/test_offpolicy.py``:
requests drawn from a pool whose exact expected reward per weighting is
known (the synthetic generator's truth), the service's own epsilon-greedy
policy and ranking, Bernoulli clicks and purchases, reward click 1 and
purchase 5. Coverage of the 95% intervals, 2000 replications per row, of an
explored non-base vector (P = 0.02, epsilon 0.1), by the expected number of
requests ranked with it; "sparse" has every click 10 times rarer; "minimums
off" answers any log with 2 matches and a reward; "answered" is the share of
logs not refused, the coverage among those:

                  dense: 77% of lists rewarded           sparse: 14% of lists rewarded
  expected   minimums off     minimums on               minimums off     minimums on
  matches    IPS SNIPS  DR    answered  IPS SNIPS  DR   IPS SNIPS  DR    answered  IPS SNIPS  DR
       10    .91  .90  .97          0%    -    -    -   .75  .71  .91          0%    -    -    -
       20    .92  .92  .96          2%  .91  .93  .86   .76  .76  .93          0%    -    -    -
       30    .93  .94  .95         51%  .99  .94  .96   .87  .86  .92          0%    -    -    -
       50    .94  .93  .95        100%  .94  .93  .95   .88  .90  .93          0%    -    -    -
      100    .95  .95  .95        100%  .95  .95  .95   .92  .92  .94         10%  .93  .95  .95
      200    .95  .95  .96        100%  .95  .95  .96   .94  .94  .94         97%  .96  .95  .94
      500    .95  .96  .94        100%  .95  .96  .94   .94  .94  .95        100%  .94  .94  .95

Over 213 settings (rewards dense, sparse and 30 times sparser; epsilon 0.5
and 0.1; the base vector and an explored one at 10 to 800 expected matches;
a period exploring around the declared weights followed by one serving the
target, in 20 combinations of sizes), 300 replications each, the 110 where
the minimums answered at least 100 logs all covered at 0.90 or more with
every estimator (lowest 0.904, mean 0.95). The same minimums applied to
the log as a whole instead of per policy left 14 settings below 0.90, the
lowest at 0.55 (IPS, 1000 requests exploring the target at 2% then 1000
serving it, 4% of lists rewarded).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from models.decisions.exploration_log import RequestLog, format_weights, normalise
from models.decisions.offpolicy_estimators import (MIN_ESS, MIN_MATCHING, MIN_REWARDED, Estimate, Evaluation,
                                                   Minimums, Refused, dr_terms, estimate, interval, shortfall,
                                                   snips_terms, with_evidence)

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["Comparison", "evaluate_weighting", "judgeable", "compare"]

_THIN = "its policy ranked too few requests with the target"


@dataclass(frozen=True)
class Comparison:
    """``proposal`` against ``current`` on the requests both can be judged on; ``refused`` says why not."""

    proposal: dict[str, float]
    current: dict[str, float]
    method: str = ""  # "DR" or "SNIPS"
    requests: int = 0
    proposal_value: Estimate | None = None
    current_value: Estimate | None = None
    difference: Estimate | None = None  # proposal - current
    refused: str | None = None


def evaluate_weighting(requests: pd.DataFrame, target: dict[str, float], rewards: dict[str, float], *,
                       min_matching: int = MIN_MATCHING, min_rewarded: int = MIN_REWARDED,
                       min_ess: float = MIN_ESS) -> Evaluation:
    """The reward per request of always ranking with ``target``, over the requests that can judge it.

    ``requests``: the request table (``logged_requests``); ``rewards``: per event. ``Refused`` when no request
    supports the target or the evidence is below the minimums; its message lists the weightings the log can
    judge.
    """
    minimums = Minimums(min_matching, min_rewarded, min_ess)
    log = RequestLog(requests, rewards)
    tid = log.target_id(target)
    t = log.weightings[tid] if tid >= 0 else normalise(target)  # as logged: what the log prints reads back to it
    support = log.support(t)
    sample = log.sample(t, support)
    try:
        result = estimate(sample, min_matching=min_matching, min_rewarded=min_rewarded, min_ess=min_ess,
                          policy_names=log.policy_names())
    except Refused as e:
        raise Refused(f"target {format_weights(t)}: {e}{_left_out(support.left_out)}.\n"
                      f"{_judgeable_text(log, minimums)}") from None
    keep = with_evidence(sample, minimums)
    thin = int((~keep).sum())
    return replace(result, target=t, used=log.used_by(support.rows[keep]),
                   left_out={**support.left_out, **({_THIN: thin} if thin else {})})


def judgeable(requests: pd.DataFrame, rewards: dict[str, float], *, min_matching: int = MIN_MATCHING,
              min_rewarded: int = MIN_REWARDED,
              min_ess: float = MIN_ESS) -> list[tuple[dict[str, float], int, float]]:
    """The weightings the log has the evidence to judge, most matching requests first: (weighting, matching, ESS)."""
    return _judgeable(RequestLog(requests, rewards), Minimums(min_matching, min_rewarded, min_ess))[0]


def _judgeable(log: RequestLog, minimums: Minimums) -> tuple[list[tuple[dict[str, float], int, float]], int]:
    """The weightings with the evidence, and how many more the log supports with too little of it."""
    enough, short = [], 0
    for w in log.weightings:
        support = log.support(w)
        if not len(support.rows):
            continue
        sample = log.sample(w, support)
        kept = sample.subset(with_evidence(sample, minimums))
        if kept.requests and kept.ess >= minimums.ess:
            enough.append((w, kept.matching, kept.ess))
        else:
            short += 1
    return sorted(enough, key=lambda x: -x[1]), short


def _judgeable_text(log: RequestLog, minimums: Minimums) -> str:
    enough, short = _judgeable(log, minimums)
    more = f" ({short} more that it could have drawn, with too little evidence)" if short else ""
    if not enough:
        return f"The log has the evidence to judge no weighting{more}."
    lines = "\n".join(f"  {format_weights(w)}  ({m:,} requests ranked with it, ESS {e:.1f})" for w, m, e in enough)
    return f"The log can judge these{more}:\n{lines}"


def _left_out(left_out: dict[str, int]) -> str:
    return ("; left out: " + ", ".join(f"{n:,} {why}" for why, n in left_out.items())) if left_out else ""


def compare(requests: pd.DataFrame, proposal: dict[str, float], current: dict[str, float],
            rewards: dict[str, float], *, min_matching: int = MIN_MATCHING, min_rewarded: int = MIN_REWARDED,
            min_ess: float = MIN_ESS) -> Comparison:
    """``proposal`` minus ``current`` in reward per request, on the requests that can judge both.

    Those are the requests of the logging policies that could draw both and have the evidence for each. Why
    only those: a request that supports one alone belongs to a period the other could not be shown in, and a
    difference across periods would mix the weighting with the period. On the shared requests the two
    estimates are not independent even though no request drew both: SNIPS's normalisation and DR's reward
    model use every supported request, so the two move together with the traffic, while IPS's disjoint
    matches pull them apart. The interval is therefore built from the per-request difference of the two
    influence terms, which carries their covariance whatever its sign (adding the two variances would be too
    wide for DR and SNIPS). The estimator is DR where every shared request has the reward model, else SNIPS.
    Never raises on a log short of evidence: ``refused`` says why.
    """
    minimums = Minimums(min_matching, min_rewarded, min_ess)
    p, c = normalise(proposal), normalise(current)
    out = Comparison(proposal=p, current=c)
    log = RequestLog(requests, rewards)
    supports = [log.support(w) for w in (p, c)]
    judged = []
    for w, support in zip((p, c), supports):
        sample = log.sample(w, support)
        judged.append(set(support.rows[with_evidence(sample, minimums)].tolist()))
    shared = np.array(sorted(judged[0] & judged[1]), dtype=np.int64)
    if not len(shared):
        return replace(out, refused=f"no logging policy could draw both {format_weights(p)} and "
                                    f"{format_weights(c)} with the evidence to judge each")
    samples = [log.sample(w, support, shared) for w, support in zip((p, c), supports)]
    for name, w, s in zip(("proposal", "current"), (p, c), samples):
        if s.ess < minimums.ess:
            return replace(out, requests=len(shared),
                           refused=f"{name} {format_weights(w)}: {shortfall(s, s, minimums, None)}")
    modelled = all(not (np.isnan(s.model_target).any() or np.isnan(s.model_chosen).any()) for s in samples)
    method, estimator = ("DR", dr_terms) if modelled else ("SNIPS", snips_terms)
    (vp, ip), (vc, ic) = estimator(samples[0]), estimator(samples[1])
    df = min(s.matching for s in samples) - 1
    return replace(out, method=method, requests=len(shared), proposal_value=interval(vp, ip, df),
                   current_value=interval(vc, ic, df), difference=interval(vp - vc, ip - ic, df))
