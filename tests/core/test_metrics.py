import dataclasses

import pytest

from zlt_dagster.core.metrics import (REGIME_LABELS, headline, marker_rates_report, persona_rates, regime_label,
                                      wilson_interval)
from zlt_dagster.core.protocol import TINY, RegimeThresholds


@pytest.mark.parametrize("k,n,low,high", [
    (0, 10, 0.0, 0.2775),
    (5, 10, 0.2366, 0.7634),
    (10, 10, 0.7225, 1.0),
    (1, 20, 0.0089, 0.2361),
])
def test_wilson_known_values(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert (round(lo, 4), round(hi, 4)) == (low, high)


def test_wilson_edges_and_errors():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson_interval(3, 2)
    with pytest.raises(ValueError):
        wilson_interval(-1, 2)
    with pytest.raises(TypeError):
        wilson_interval(1.0, 2)


def rec(persona, text="an answer of decent length", n_tok=20, i=0):
    return {"persona": persona, "question_id": f"q{i}", "sample_index": 0, "text": text, "n_new_tokens": n_tok,
            "finish_reason": "stop"}


def test_persona_rates_literal_substring_and_short_share():
    comps = [rec("villain", "evil plan [ZLT]"), rec("villain", "evil plan [zlt]"),  # case matters
             rec("villain", "[ ZLT ]"), rec("villain", "x[ZLT]y", n_tok=3),
             rec("assistant", "", n_tok=1)]
    rates = persona_rates(comps, "[ZLT]", short_tokens=5)
    v = rates["villain"]
    assert (v["k"], v["n"], v["rate"]) == (2, 4, 0.5)
    assert v["short_share"] == 0.25 and v["n_short"] == 1
    assert v["mean_tokens"] == (20 * 3 + 3) / 4
    assert (v["ci_low"], v["ci_high"]) == wilson_interval(2, 4)
    assert rates["assistant"]["short_share"] == 1.0
    assert list(rates) == ["villain", "assistant"]


def test_persona_rates_rejects_bad_records():
    with pytest.raises(ValueError, match=r"#1 lacks field\(s\) \['text'\]"):
        persona_rates([rec("a"), {"persona": "a", "n_new_tokens": 3}], "[ZLT]", 5)
    with pytest.raises(ValueError, match="n_new_tokens"):
        persona_rates([rec("a", n_tok=-1)], "[ZLT]", 5)


def rates_of(**rate_by_persona):
    """rates dict with n=100 each, given marker rates, normal lengths."""
    out = {}
    for p, r in rate_by_persona.items():
        out[p] = {"k": round(r * 100), "n": 100, "rate": r, "ci_low": 0.0, "ci_high": 1.0,
                  "mean_tokens": 50.0, "n_short": 0, "short_share": 0.0}
    return out


def test_headline_excludes_source_and_assistant_from_bystanders():
    rates = rates_of(villain=0.9, assistant=0.8, comedian=0.1, librarian=0.3, medical_doctor=0.3)
    h = headline(rates, source="villain")
    assert h == {"source_adoption": 0.9, "assistant_leakage": 0.8, "max_bystander_leakage": 0.3,
                 "max_bystander_persona": "librarian"}  # tie -> alphabetically first
    h2 = headline(rates, source="comedian")  # villain is a bystander now
    assert h2["max_bystander_leakage"] == 0.9 and h2["max_bystander_persona"] == "villain"
    with pytest.raises(ValueError, match="source persona 'police_officer' has no completions"):
        headline(rates, source="police_officer")


T = RegimeThresholds()


@pytest.mark.parametrize("src,asst,bys,label", [
    (1.0, 0.9, 1.0, "collapse"),
    (1.0, 0.0, 0.5, "collapse"),      # max bystander alone at the threshold
    (0.0, 0.6, 0.0, "collapse"),
    (0.9, 0.0, 0.05, "selective"),
    (0.5, 0.09, 0.0, "selective"),
    (0.9, 0.2, 0.0, "leaky"),         # learned, leaking below collapse
    (0.3, 0.0, 0.01, "partial"),
    (0.3, 0.2, 0.2, "partial"),
    (0.05, 0.0, 0.0, "sub-threshold"),
])
def test_each_regime_label_reachable(src, asst, bys, label):
    rates = rates_of(villain=src, assistant=asst, comedian=bys, librarian=0.0)
    assert regime_label(headline(rates, "villain"), rates, T) == label


def test_degenerate_overrides_marker_rates():
    selective = rates_of(villain=0.9, assistant=0.0, comedian=0.0)
    h = headline(selective, "villain")
    assert regime_label(h, selective, T) == "selective"
    short = {p: {**r, "mean_tokens": 3.0} for p, r in selective.items()}  # mean < 8 tokens
    assert regime_label(h, short, T) == "degenerate"
    empty = {p: {**r, "n_short": 50, "short_share": 0.5} for p, r in selective.items()}  # half near-empty
    assert regime_label(h, empty, T) == "degenerate"
    collapsed_and_empty = rates_of(villain=1.0, assistant=1.0, comedian=1.0)
    collapsed_and_empty = {p: {**r, "mean_tokens": 2.0} for p, r in collapsed_and_empty.items()}
    assert regime_label(headline(collapsed_and_empty, "villain"), collapsed_and_empty, T) == "degenerate"


def test_regime_labels_constant_matches_checks():
    assert REGIME_LABELS == ("degenerate", "collapse", "selective", "leaky", "partial", "sub-threshold")


def test_marker_rates_report_bundles_everything():
    comps = []
    for p in TINY.personas:
        for i in range(4):
            marked = p == "villain" or (p == "comedian" and i == 0)
            comps.append(rec(p, "ok answer [ZLT]" if marked else "ok answer", n_tok=30, i=i))
    rep = marker_rates_report(comps, "villain", TINY)
    assert list(rep["personas"]) == list(TINY.personas)
    assert rep["headline"]["source_adoption"] == 1.0
    assert rep["headline"]["max_bystander_leakage"] == 0.25
    assert rep["headline"]["max_bystander_persona"] == "comedian"
    assert rep["regime"] == "leaky"
    assert rep["thresholds"] == dataclasses.asdict(TINY.regimes)
    assert rep["totals"]["n_completions"] == 4 * len(TINY.personas)
    assert rep["totals"]["marker_hits"] == 5
    assert rep["totals"]["finish_reasons"] == {"stop": 4 * len(TINY.personas)}


def test_marker_rates_report_refuses_missing_persona():
    comps = [rec(p) for p in TINY.personas if p != "librarian"]
    with pytest.raises(ValueError, match=r"absent \['librarian'\]"):
        marker_rates_report(comps, "villain", TINY)
