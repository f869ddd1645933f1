"""Compiled results (SPEC asset 6) and the three-panel LR x epochs heatmap (asset 7).

The caller assembles one record per finished cell:
    {"cell": {"lr", "epochs", "key"}, "marker_rates": <metrics.marker_rates_report>, "arc": {"acc", "acc_norm",
     "n", ...} or None, "train": {"steps", "tokens", "wall_seconds", "tokens_per_s", "final_loss", ...},
     "artifacts": {name: storage key}}
Nothing here invents a number: a cell without a record is listed under `missing_cells` and drawn as "n/a".
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from .protocol import Cell, Sweep

HEADLINE_PANELS: tuple[tuple[str, str], ...] = (
    ("source_adoption", "Source adoption"),
    ("assistant_leakage", "Assistant leakage"),
    ("max_bystander_leakage", "Max bystander leakage"),
)
TRAIN_FIELDS = ("steps", "tokens", "supervised_tokens", "wall_seconds", "tokens_per_s", "gpu_seconds", "first_loss",
                "final_loss", "data_hash")
ARC_FIELDS = ("acc", "acc_norm", "n")


def compile_results(sweep: Sweep, cell_records: Mapping[str, Mapping[str, Any]],
                    missing: Sequence[str]) -> dict[str, Any]:
    """One JSON-able dict for the whole sweep. `missing_cells` is the sorted union of `missing` and every sweep
    cell that has no record (a cell absent from both is still missing, never silently dropped)."""
    grid = {c.key: c for c in sorted(sweep.cells())}
    unknown = [k for k in list(cell_records) + list(missing) if k not in grid]
    if unknown:
        raise ValueError(f"compile_results: cell key(s) {unknown} are not cells of sweep {sweep.sweep_id!r}; "
                         f"expected keys like {list(grid)[:3]}")
    both = sorted(set(cell_records) & set(missing))
    if both:
        raise ValueError(f"compile_results: cell(s) {both} have a record and are also listed as missing")
    cells = {key: _compile_cell(key, grid[key], cell_records[key]) for key in grid if key in cell_records}
    missing_cells = [key for key in grid if key not in cell_records]  # grid order = sorted (lr, epochs)
    return {
        "sweep_id": sweep.sweep_id,
        "sweep": sweep.to_dict(),
        "sweep_config_hash": sweep.config_hash(),
        "protocol_config_hash": sweep.protocol.config_hash(),
        "source_persona": sweep.source_persona,
        "marker": sweep.protocol.marker,
        "grid": {"learning_rates": sorted({c.lr for c in grid.values()}),
                 "epochs": sorted({c.epochs for c in grid.values()})},
        "n_cells": len(grid),
        "n_complete": len(cells),
        "missing_cells": missing_cells,
        "cells": cells,
    }


def _compile_cell(key: str, cell: Cell, rec: Mapping[str, Any]) -> dict[str, Any]:
    where = f"compile_results: record for cell {key!r}"
    for name in ("cell", "marker_rates"):
        if name not in rec:
            raise ValueError(f"{where} lacks {name!r}; expected keys cell, marker_rates, arc, train, artifacts "
                             f"(got {sorted(rec)})")
    given = rec["cell"]
    if given.get("key", key) != key or float(given.get("lr", cell.lr)) != cell.lr \
            or int(given.get("epochs", cell.epochs)) != cell.epochs:
        raise ValueError(f"{where} describes a different cell: {dict(given)}")
    mr = rec["marker_rates"]
    for name in ("headline", "personas", "regime"):
        if name not in mr:
            raise ValueError(f"{where}: marker_rates lacks {name!r}; expected a metrics.marker_rates_report dict")
    arc = rec.get("arc")
    train = rec.get("train") or {}
    train_out = {f: train.get(f) for f in TRAIN_FIELDS}  # absent stays None
    if train_out["tokens_per_s"] is None and train_out["tokens"] and train_out["wall_seconds"]:
        train_out["tokens_per_s"] = train_out["tokens"] / train_out["wall_seconds"]
    return {
        "key": key,
        "lr": cell.lr,
        "epochs": cell.epochs,
        "regime": mr["regime"],
        "headline": dict(mr["headline"]),
        "personas": {p: dict(r) for p, r in mr["personas"].items()},
        "totals": dict(mr.get("totals", {})),
        "arc": None if arc is None else {f: arc.get(f) for f in ARC_FIELDS},
        "train": train_out,
        "artifacts": dict(rec.get("artifacts") or {}),
    }


# --- heatmap ---------------------------------------------------------------------------------------------------
def _pct(v: float) -> str:
    """28.5 -> '28.5%', 100.0 -> '100%': one decimal only where it says something."""
    p = round(100 * v, 1)
    return f"{p:.0f}%" if p == int(p) else f"{p:.1f}%"


def build_heatmap_figure(compiled: Mapping[str, Any], title: str | None = None):
    """(figure, [three data axes]). Rows = learning rates ascending, columns = epochs ascending; each cell shows
    its percentage ("deg" marks a degenerate cell), a cell without results is grey, hatched and "n/a"."""
    # A bare Figure (no pyplot): no global backend state, no display needed, safe in threads; savefig renders
    # through matplotlib's Agg canvas for PNG and its PDF backend for PDF.
    import matplotlib
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import PercentFormatter

    lrs, eps = compiled["grid"]["learning_rates"], compiled["grid"]["epochs"]
    by_pos = {(c["lr"], c["epochs"]): c for c in compiled["cells"].values()}
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    fig = Figure(figsize=(4.2 * len(HEADLINE_PANELS) + 1, 0.55 * len(lrs) + 2), layout="constrained")
    axes = list(fig.subplots(1, len(HEADLINE_PANELS), squeeze=False)[0])
    image = None
    for ax, (field, label) in zip(axes, HEADLINE_PANELS):
        values = np.full((len(lrs), len(eps)), np.nan)
        for (i, lr), (j, ep) in ((a, b) for a in enumerate(lrs) for b in enumerate(eps)):
            cell = by_pos.get((lr, ep))
            if cell is not None and cell["headline"].get(field) is not None:
                values[i, j] = cell["headline"][field]
        image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
        for i, lr in enumerate(lrs):
            for j, ep in enumerate(eps):
                cell = by_pos.get((lr, ep))
                if np.isnan(values[i, j]):
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", edgecolor="grey",
                                           linewidth=0))
                    ax.text(j, i, "n/a", ha="center", va="center", fontsize=8, color="dimgrey")
                    continue
                text = _pct(values[i, j]) + ("\ndeg" if cell["regime"] == "degenerate" else "")
                ax.text(j, i, text, ha="center", va="center", fontsize=8,
                        color="black" if values[i, j] > 0.6 else "white")  # contrast on viridis
        ax.set_title(label if field != "source_adoption" else f"{label} ({compiled.get('source_persona', '?')})")
        ax.set_xticks(range(len(eps)), [str(e) for e in eps])
        ax.set_yticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
        ax.set_xlabel("epochs")
        ax.set_ylabel("learning rate")
    fig.colorbar(image, ax=axes, label=f"share of completions containing {compiled.get('marker', 'the marker')}",
                 shrink=0.9, format=PercentFormatter(xmax=1.0))
    fig.suptitle(title or f"{compiled.get('sweep_id', 'sweep')}: {compiled.get('n_complete', '?')}/"
                          f"{compiled.get('n_cells', '?')} cells")
    return fig, axes


def plot_heatmap(compiled: Mapping[str, Any], png_path: str | Path, pdf_path: str | Path,
                 title: str | None = None) -> list[str]:
    """Write the heatmap as PNG (150 dpi) and PDF; return the written paths."""
    fig, _ = build_heatmap_figure(compiled, title)
    return save_figure(fig, png_path, pdf_path)


def save_figure(fig, png_path: str | Path, pdf_path: str | Path) -> list[str]:
    """Write a figure as PNG (150 dpi) and PDF, creating parent directories; return the written paths."""
    paths = []
    # no CreationDate in the PDF: the same results give a byte-identical file
    for path, kwargs in ((Path(png_path), {"dpi": 150}), (Path(pdf_path), {"metadata": {"CreationDate": None}})):
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, **kwargs)
        paths.append(str(path))
    return paths
