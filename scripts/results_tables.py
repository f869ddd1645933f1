"""Markdown tables of an exported sweep (`zlt export`, e.g. results/smollm2-135m-villain/): what RESULTS.md quotes.

    python scripts/results_tables.py results/smollm2-135m-villain

Prints: the regime grid (source / assistant / max bystander adoption, %, and the label), the Wilson 95% intervals
and completion lengths per cell, ARC-Challenge per cell against the base model, and the GPU seconds per asset as
the records give them (each record's own wall time on its GPU; passes that ran side by side on two GPUs are summed,
so the total is GPU time, not wall time).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def tables(root: Path) -> str:
    compiled = _load(root / "compiled_results.json")
    lrs, epochs = compiled["grid"]["learning_rates"], compiled["grid"]["epochs"]
    cells = compiled["cells"]
    key = {(c["lr"], c["epochs"]): k for k, c in cells.items()}
    out = [f"### {compiled['sweep_id']}: {compiled['n_complete']} of {compiled['n_cells']} cells", "",
           "Source / assistant / max bystander adoption of the marker (%), and the regime:", "",
           "| LR \\ epochs | " + " | ".join(str(e) for e in epochs) + " |", "|---|" + "---|" * len(epochs)]
    for lr in lrs:
        row = []
        for ep in epochs:
            c = cells.get(key.get((lr, ep)))
            h = c and c["headline"]
            row.append("missing" if not c else f"{_pct(h['source_adoption'])} / {_pct(h['assistant_leakage'])} / "
                                               f"{_pct(h['max_bystander_leakage'])} {c['regime']}")
        out.append(f"| {lr:g} | " + " | ".join(row) + " |")

    out += ["", "Per cell: source and max bystander rate with Wilson 95% interval (k of n), mean completion tokens over "
            "all personas (source's own in brackets), near-empty share, ARC-Challenge acc_norm (acc):", "",
            "| cell | regime | source | max bystander (who) | assistant | mean tokens (source) | near-empty | "
            "ARC acc_norm (acc) |", "|---|---|---|---|---|---|---|---|"]
    base = compiled.get("base_model_arc") or {}
    for lr in lrs:
        for ep in epochs:
            k = key.get((lr, ep))
            mr = _load(root / "cells" / str(k) / "marker_rates.json") if k else None
            arc = _load(root / "cells" / str(k) / "arc_scores.json") if k else None
            if not mr:
                continue
            p = mr["personas"]
            src = p[mr["source"]]
            byst_name = cells[k]["headline"]["max_bystander_persona"]
            byst, asst = p[byst_name], p[mr["assistant"]]
            n_all = sum(r["n"] for r in p.values())
            mean_tok = sum(r["mean_tokens"] * r["n"] for r in p.values()) / n_all
            short = sum(r["n_short"] for r in p.values()) / n_all

            def ci(r):
                return f"{r['k']}/{r['n']} [{_pct(r['ci_low'])}-{_pct(r['ci_high'])}]"
            out.append(f"| {k} | {cells[k]['regime']} | {ci(src)} | {ci(byst)} ({byst_name}) | {ci(asst)} | "
                       f"{mean_tok:.0f} ({src['mean_tokens']:.0f}) | {_pct(short)}% | "
                       + (f"{arc['acc_norm']:.3f} ({arc['acc']:.3f})" if arc else "-") + " |")
    if base:
        out += ["", f"Base model ARC-Challenge: acc_norm {base['acc_norm']:.3f}, acc {base['acc']:.3f} "
                    f"(n = {base['n']})."]

    # GPU seconds per asset, from the records (train_run.json: the pass's wall time when its last cell committed)
    onp, barc = _load(root / "onpolicy_stats.json"), _load(root / "base_arc_scores.json")
    passes: dict[tuple, float] = {}
    comp = arc_s = 0.0
    n_comp = n_arc = 0  # cells with the record (a partial export has fewer than the grid)
    for k in cells:
        tr = _load(root / "cells" / k / "train_run.json")
        if tr and tr.get("group"):
            g = tr["group"]
            key_ = tuple(sorted(g["cells"]))
            passes[key_] = max(passes.get(key_, 0.0), g["wall_s"])
        cs, ac = _load(root / "cells" / k / "completions_stats.json"), _load(root / "cells" / k / "arc_scores.json")
        comp += cs["gpu_s"] if cs else 0.0
        arc_s += ac["gpu_s"] if ac else 0.0
        n_comp, n_arc = n_comp + bool(cs), n_arc + bool(ac)
    rows = [("onpolicy_data", onp and onp["gpu_s"]), ("base_arc_scores", barc and barc["gpu_s"]),
            (f"adapter ({len(passes)} training pass(es): "
             + ", ".join(f"{len(c)} cells {s:.0f} s" for c, s in passes.items()) + ")", sum(passes.values())),
            (f"completions ({n_comp} cells)", comp), (f"arc_scores ({n_arc} cells)", arc_s)]
    total = sum(s or 0.0 for _, s in rows)
    out += ["", "GPU seconds per asset (the steps' own timings, model loading and Dagster overhead excluded):", "",
            "| asset | GPU s |", "|---|---|"] + [f"| {a} | {s:.1f} |" for a, s in rows if s is not None]
    out += [f"| total | {total:.1f} ({total / 60:.1f} GPU-min) |"]
    return "\n".join(out)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(tables(Path(arg)))
        print()
