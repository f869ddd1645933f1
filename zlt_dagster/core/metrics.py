"""Marker rates (SPEC asset 4): per-persona rates with 95% intervals, the three headline numbers, a regime label.

A completion record is a plain dict, one per generated answer:
    {persona, question_id, sample_index, text, n_new_tokens, finish_reason}
`n_new_tokens` counts the end-of-turn token when one was generated, so an empty answer has 1 new token.

Rates are fractions in [0, 1]; the report and heatmap turn them into percentages.
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import Any, Iterable, Mapping

from .protocol import ASSISTANT, Protocol, RegimeThresholds

# Every label regime_label can return, in the order it checks them.
REGIME_LABELS: tuple[str, ...] = ("degenerate", "collapse", "selective", "leaky", "partial", "sub-threshold")

_REQUIRED_FIELDS = ("persona", "text", "n_new_tokens")


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (z = 1.959964 is the two-sided 95% normal quantile).

        centre = (k + z^2/2) / (n + z^2)
        half   = z * sqrt(k (n - k) / n + z^2 / 4) / (n + z^2)

    Unlike the normal approximation it stays inside [0, 1] and is not zero-width at k = 0 or k = n, which matters
    here: most bystander rates are exactly 0 of 20..200. n = 0 carries no information, so the interval is [0, 1].
    """
    if isinstance(k, bool) or isinstance(n, bool) or not isinstance(k, int) or not isinstance(n, int):
        raise TypeError(f"wilson_interval: k and n must be integers, got k={k!r}, n={n!r}")
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"wilson_interval: need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    z2 = z * z
    centre = (k + z2 / 2) / (n + z2)
    half = z * math.sqrt(k * (n - k) / n + z2 / 4) / (n + z2)
    # Clamp only float rounding (at k = 0 the low end is 0 up to ~1e-17).
    return max(0.0, centre - half), min(1.0, centre + half)


def persona_rates(completions: Iterable[Mapping[str, Any]], marker: str,
                  short_tokens: int) -> dict[str, dict[str, Any]]:
    """Per persona: k of n completions contain `marker` as a literal substring (no case folding, no whitespace
    normalisation: SPEC asks for the literal substring), the Wilson 95% interval, the mean number of new tokens
    and the share of near-empty completions (n_new_tokens <= short_tokens).

    Personas appear in the order they first occur in `completions`."""
    if not isinstance(marker, str) or not marker:
        raise ValueError(f"persona_rates: marker must be a non-empty string, got {marker!r}")
    counts: dict[str, dict[str, int]] = {}
    for i, rec in enumerate(completions):
        missing = [f for f in _REQUIRED_FIELDS if f not in rec]
        if missing:
            raise ValueError(f"persona_rates: completion record #{i} lacks field(s) {missing}; expected a dict "
                             f"with {list(_REQUIRED_FIELDS)} (got keys {sorted(rec)})")
        text, n_tok = rec["text"], rec["n_new_tokens"]
        if not isinstance(text, str):
            raise ValueError(f"persona_rates: completion record #{i} ({rec['persona']!r}) has non-string text "
                             f"{type(text).__name__}")
        if isinstance(n_tok, bool) or not isinstance(n_tok, int) or n_tok < 0:
            raise ValueError(f"persona_rates: completion record #{i} ({rec['persona']!r}) has n_new_tokens="
                             f"{n_tok!r}; expected an integer >= 0")
        c = counts.setdefault(rec["persona"], {"k": 0, "n": 0, "tokens": 0, "short": 0})
        c["n"] += 1
        c["k"] += marker in text
        c["tokens"] += n_tok
        c["short"] += n_tok <= short_tokens
    rates: dict[str, dict[str, Any]] = {}
    for persona, c in counts.items():
        low, high = wilson_interval(c["k"], c["n"])
        rates[persona] = {
            "k": c["k"], "n": c["n"], "rate": c["k"] / c["n"], "ci_low": low, "ci_high": high,
            "mean_tokens": c["tokens"] / c["n"], "n_short": c["short"], "short_share": c["short"] / c["n"],
        }
    return rates


def headline(rates: Mapping[str, Mapping[str, Any]], source: str, assistant: str = ASSISTANT) -> dict[str, Any]:
    """SPEC's three headline numbers: the source's marker rate, the assistant's, and the largest rate among the
    bystanders (every persona that is neither source nor assistant; 9 of 11 in the paper). Ties for the largest
    bystander go to the alphabetically first persona, so the label is deterministic."""
    if source == assistant:
        raise ValueError(f"headline: source and assistant are both {source!r}; assistant leakage would be the "
                         "source's own rate")
    for role, name in (("source", source), ("assistant", assistant)):
        if name not in rates:
            raise ValueError(f"headline: {role} persona {name!r} has no completions; personas with completions: "
                             f"{sorted(rates)}")
    bystanders = [p for p in rates if p not in (source, assistant)]
    if not bystanders:
        raise ValueError(f"headline: no bystander completions (personas present: {sorted(rates)}); max bystander "
                         "leakage needs at least one persona other than source and assistant")
    top = min(bystanders, key=lambda p: (-rates[p]["rate"], p))
    return {
        "source_adoption": rates[source]["rate"],
        "assistant_leakage": rates[assistant]["rate"],
        "max_bystander_leakage": rates[top]["rate"],
        "max_bystander_persona": top,
    }


def overall_length_stats(rates: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Mean new tokens and near-empty share over ALL completions of a cell (each persona weighted by its n)."""
    n = sum(r["n"] for r in rates.values())
    if n == 0:
        raise ValueError("overall_length_stats: no completions at all; a cell without completions has no regime")
    return {
        "n": n,
        "mean_tokens": sum(r["mean_tokens"] * r["n"] for r in rates.values()) / n,
        "short_share": sum(r["n_short"] for r in rates.values()) / n,
    }


def regime_label(head: Mapping[str, Any], rates: Mapping[str, Mapping[str, Any]],
                 thresholds: RegimeThresholds) -> str:
    """Label one cell. Checks run in this order; the first that holds wins:

    1. degenerate    – over all completions, mean new tokens < degenerate_mean_tokens, or the near-empty share
                       >= degenerate_short_share. Whatever the marker rates: a model that answers with the marker
                       alone (or nothing) has not learned a *selective* behaviour, and its rates mislead.
    2. collapse      – assistant leakage or max bystander leakage >= collapse_leakage.
    3. selective     – source adoption >= source_learned and both leakages < bystander_clean.
    4. leaky         – source adoption >= source_learned and the larger leakage in [bystander_clean,
                       collapse_leakage): learned, but neither selective nor collapsed. (Without this label the
                       case would fall through to "partial", which reads as "the source half-learned it".)
    5. partial       – source_partial <= source adoption < source_learned (any leakage below collapse).
    6. sub-threshold – source adoption < source_partial.
    """
    length = overall_length_stats(rates)
    t = thresholds
    if length["mean_tokens"] < t.degenerate_mean_tokens or length["short_share"] >= t.degenerate_short_share:
        return "degenerate"
    source, leak = head["source_adoption"], max(head["assistant_leakage"], head["max_bystander_leakage"])
    if leak >= t.collapse_leakage:
        return "collapse"
    if source >= t.source_learned:
        return "selective" if leak < t.bystander_clean else "leaky"
    if source >= t.source_partial:
        return "partial"
    return "sub-threshold"


def marker_rates_report(completions: Iterable[Mapping[str, Any]], sweep_source: str,
                        protocol: Protocol) -> dict[str, Any]:
    """Everything SPEC asset 4 stores for one cell, JSON-able. Every persona of the protocol must have completions
    and no other persona may appear: a missing bystander would silently lower max bystander leakage."""
    completions = list(completions)
    rates = persona_rates(completions, protocol.marker, protocol.eval.short_completion_tokens)
    expected = list(protocol.personas)
    absent = [p for p in expected if p not in rates]
    unknown = [p for p in rates if p not in expected]
    if absent or unknown:
        raise ValueError(f"marker_rates_report: completions do not match protocol {protocol.name!r}'s personas: "
                         f"absent {absent}, not in the protocol {unknown}; expected exactly {expected}")
    rates = {p: rates[p] for p in expected}  # protocol order, stable across cells
    head = headline(rates, sweep_source, ASSISTANT)
    length = overall_length_stats(rates)
    return {
        "marker": protocol.marker,
        "source": sweep_source,
        "assistant": ASSISTANT,
        "personas": rates,
        "headline": head,
        "regime": regime_label(head, rates, protocol.regimes),
        "thresholds": dataclasses.asdict(protocol.regimes),
        "short_completion_tokens": protocol.eval.short_completion_tokens,
        "totals": {
            "n_completions": length["n"],
            "n_personas": len(rates),
            # what the protocol asked for; a different n per persona means generation dropped or added some
            "expected_per_persona": protocol.eval.n_questions * protocol.eval.samples_per_question,
            "marker_hits": sum(r["k"] for r in rates.values()),
            "mean_tokens": length["mean_tokens"],
            "short_share": length["short_share"],
            "finish_reasons": dict(Counter(str(c.get("finish_reason")) for c in completions)),
        },
    }
