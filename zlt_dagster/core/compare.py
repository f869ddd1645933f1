"""The comparison view: the same (LR, epochs) cell across sweeps that differ in one thing (seed, marker tail).

A follow-up file (configs/followups/*.yaml) names the sweeps (`sweeps`, plus `compare.with` for sweeps it
compares against but does not schedule) and the cells (`compare.cells`). For each cell and sweep this reads the
cell's marker_rates.json and reports the three headline numbers as k of n with the Wilson 95% interval (the max
bystander's interval is that persona's). A sweep that has not finished the cell is listed as missing, never
invented. Output: one JSON and one figure (a panel per cell, error bars = the intervals).

Pure: the store is read and written by steps/compare.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from .metrics import wilson_interval
from .protocol import Cell, ProtocolError, Sweep
from .sweep_file import sweep_from_dict, yaml_loader
from .report import save_figure

METRICS: tuple[tuple[str, str], ...] = (("source_adoption", "source"), ("assistant_leakage", "assistant"),
                                        ("max_bystander_leakage", "max bystander"))
# sweep fields that can tell variants apart, in the order labels name them
_FIELDS = ("source_persona", "seed", "marker_tail_tokens", "base_model", "protocol")


def load_followup(path: str | Path) -> tuple[list[Sweep], list[Cell]]:
    """(sweeps to compare, cells) from a follow-up file: its `sweeps` plus `compare.with`, and `compare.cells`."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ProtocolError(f"follow-up file {path} does not exist")
    data = yaml.load(path.read_text(), Loader=yaml_loader())
    if not isinstance(data, dict) or not isinstance(data.get("compare"), dict):
        raise ProtocolError(f"{path}: a comparable follow-up is a mapping with 'sweeps' and 'compare: {{cells: "
                            f"[[lr, epochs], ...]}}'")
    spec = data["compare"]
    unknown = set(spec) - {"cells", "with"}
    if unknown:
        raise ProtocolError(f"{path}: compare has unknown key(s) {sorted(unknown)}; known: cells, with")
    sweeps = []
    for i, entry in enumerate(list(data.get("sweeps") or []) + list(spec.get("with") or []), 1):
        entry = {k: v for k, v in dict(entry).items() if k != "schedule"}
        try:
            sweeps.append(sweep_from_dict(entry))
        except ProtocolError as e:
            raise ProtocolError(f"{path}: sweep {i} of the comparison: {e}") from e
    cells = [Cell(float(lr), int(ep)) for lr, ep in spec.get("cells") or []]
    if len(sweeps) < 2 or not cells:
        raise ProtocolError(f"{path}: a comparison needs at least 2 sweeps and 1 cell, got {len(sweeps)} and "
                            f"{len(cells)}")
    return sweeps, cells


def _variant_fields(sweep: Sweep) -> dict[str, Any]:
    return {"source_persona": sweep.source_persona, "seed": sweep.seed,
            "marker_tail_tokens": sweep.protocol.marker_tail_tokens, "base_model": sweep.base_model,
            "protocol": sweep.protocol.name}


def _rate(k: int, n: int, persona: str) -> dict[str, Any]:
    low, high = wilson_interval(int(k), int(n))
    return {"persona": persona, "k": int(k), "n": int(n), "rate": k / n if n else None, "ci_low": low,
            "ci_high": high}


def variant_numbers(marker_rates: Mapping[str, Any]) -> dict[str, Any]:
    """The three headline numbers of one cell, each with k, n and its Wilson interval."""
    personas, head = marker_rates["personas"], marker_rates["headline"]
    who = {"source_adoption": marker_rates["source"], "assistant_leakage": marker_rates["assistant"],
           "max_bystander_leakage": head["max_bystander_persona"]}
    return {m: _rate(personas[p]["k"], personas[p]["n"], p) for m, p in who.items()}


def build_comparison(name: str, sweeps: Sequence[Sweep], cells: Sequence[Cell],
                     rates: Mapping[tuple[str, str], Mapping[str, Any] | None]) -> dict[str, Any]:
    """`rates[(sweep_id, cell.key)]` is that cell's marker_rates.json, or None if it is not there (yet)."""
    fields = [_variant_fields(s) for s in sweeps]
    varying = [f for f in _FIELDS if len({str(v[f]) for v in fields}) > 1]
    out: dict[str, Any] = {"name": name, "varying": varying, "cells": {}}
    for cell in cells:
        variants = []
        for sweep, vf in zip(sweeps, fields):
            label = ", ".join(f"{f}={vf[f]}" for f in varying) or sweep.sweep_id
            rec: dict[str, Any] = {"sweep_id": sweep.sweep_id, "label": label, **vf}
            mr = rates.get((sweep.sweep_id, cell.key))
            if cell not in sweep.cells():
                rec["status"] = "not in sweep"
            elif mr is None:
                rec["status"] = "missing"
            else:
                rec.update(status="done", regime=mr.get("regime"), metrics=variant_numbers(mr))
            variants.append(rec)
        out["cells"][cell.key] = {"lr": cell.lr, "epochs": cell.epochs, "variants": variants}
    out["n_done"] = sum(v["status"] == "done" for c in out["cells"].values() for v in c["variants"])
    out["n_expected"] = sum(len(c["variants"]) for c in out["cells"].values())
    return out


def plot_comparison(comparison: Mapping[str, Any], png_path: str | Path, pdf_path: str | Path) -> list[str]:
    """One panel per cell: x = variant, three offset series (source, assistant, max bystander) with Wilson 95%
    error bars; a variant without results is marked n/a."""
    from matplotlib.figure import Figure

    cells = list(comparison["cells"].items())
    fig = Figure(figsize=(1.0 + 4.2 * len(cells), 4.2), layout="constrained")
    axes = fig.subplots(1, len(cells), squeeze=False)[0]
    offsets = (-0.2, 0.0, 0.2)
    for ax, (key, cell) in zip(axes, cells):
        variants = cell["variants"]
        for (metric, label), dx in zip(METRICS, offsets):
            xs, ys, lo, hi = [], [], [], []
            for i, v in enumerate(variants):
                if v["status"] != "done":
                    continue
                r = v["metrics"][metric]
                xs.append(i + dx)
                ys.append(r["rate"])
                lo.append(r["rate"] - r["ci_low"])
                hi.append(r["ci_high"] - r["rate"])
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", capsize=3, label=label)
        for i, v in enumerate(variants):
            if v["status"] != "done":
                ax.text(i, 0.5, "n/a", ha="center", va="center", color="dimgrey")
        ax.set_xticks(range(len(variants)), [v["label"] for v in variants], rotation=20, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(variants) - 0.4)
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"lr={cell['lr']:g}, epochs={cell['epochs']}")
        ax.set_ylabel("marker rate (Wilson 95%)")
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"{comparison['name']}: same cell across {', '.join(comparison['varying']) or 'sweeps'} "
                 f"({comparison['n_done']}/{comparison['n_expected']} done)")
    return save_figure(fig, png_path, pdf_path)
