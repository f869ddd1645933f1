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
# The Dagster UI (1.13) shows a markdown figure in a dialog 800 CSS px wide (760 inside its padding) at a
# 1600 x 1000 window; at 100% zoom every PNG must fit it without a sideways scrollbar (measured by
# tests/e2e/test_ui_browser.py: the heatmap drawn at x 420..1180 in a dialog at 400..1200).
UI_MAX_WIDTH_PX = 760
UI_DPI = 100  # 7.6 in -> 760 px: 8 pt text is 11 px, readable at 100% zoom
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
    # three square-ish panels side by side, 760 px wide at UI_DPI: fits the UI's figure dialog at 100% zoom
    fig = Figure(figsize=(7.6, 0.42 * len(lrs) + 1.9), layout="constrained")
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
                ax.text(j, i, text, ha="center", va="center", fontsize=7,
                        color="black" if values[i, j] > 0.6 else "white")  # contrast on viridis
        ax.set_title(label if field != "source_adoption" else f"{label} ({compiled.get('source_persona', '?')})",
                     fontsize=9)
        ax.set_xticks(range(len(eps)), [str(e) for e in eps], fontsize=8)
        ax.set_yticks(range(len(lrs)), [f"{lr:g}" for lr in lrs], fontsize=8)
        ax.set_xlabel("epochs", fontsize=8)
    axes[0].set_ylabel("learning rate", fontsize=8)
    for ax in axes[1:]:  # the LR labels once, on the left: the three panels share the axes
        ax.tick_params(labelleft=False)
    bar = fig.colorbar(image, ax=axes, shrink=0.9, format=PercentFormatter(xmax=1.0))
    bar.set_label(f"completions with {compiled.get('marker', 'the marker')}", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    fig.suptitle(title or f"{compiled.get('sweep_id', 'sweep')}: {compiled.get('n_complete', '?')}/"
                          f"{compiled.get('n_cells', '?')} cells", fontsize=9)
    return fig, axes


def plot_heatmap(compiled: Mapping[str, Any], png_path: str | Path, pdf_path: str | Path,
                 title: str | None = None) -> list[str]:
    """Write the heatmap as PNG (sized for the UI, save_figure) and PDF; return the written paths."""
    fig, _ = build_heatmap_figure(compiled, title)
    return save_figure(fig, png_path, pdf_path)


def png_dpi(fig) -> float:
    """UI_DPI, lowered for a figure wider than UI_MAX_WIDTH_PX at it: every PNG fits the UI's figure dialog."""
    return min(UI_DPI, UI_MAX_WIDTH_PX / fig.get_figwidth())


def png_bytes(fig) -> bytes:
    """The figure as PNG bytes at png_dpi (for metadata shown in the UI without a stored file)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=png_dpi(fig))
    return buf.getvalue()


def save_figure(fig, png_path: str | Path, pdf_path: str | Path) -> list[str]:
    """Write a figure as PNG (png_dpi: fits the UI) and PDF (vector, for print), creating parent directories;
    return the written paths."""
    paths = []
    # no CreationDate in the PDF: the same results give a byte-identical file
    for path, kwargs in ((Path(png_path), {"dpi": png_dpi(fig)}),
                         (Path(pdf_path), {"metadata": {"CreationDate": None}})):
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, **kwargs)
        paths.append(str(path))
    return paths


# --- one cell: every persona's marker rate with its Wilson interval ---------------------------------------------
def build_cell_figure(report: Mapping[str, Any], title: str = ""):
    """(figure, axis): one horizontal bar per persona (protocol order, top to bottom) with its marker rate and
    Wilson 95% interval, the source in red, the assistant in blue, bystanders grey; "k/n" at each bar's end.
    `report` is metrics.marker_rates_report's dict ({"source", "personas": {p: {"k","n","rate","ci_low",
    "ci_high"}}, "regime"}). Raises KeyError naming a missing field."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    personas = list(report["personas"])
    rates = [report["personas"][p] for p in personas]
    colors = ["tab:red" if p == report["source"] else "tab:blue" if p == "assistant" else "grey" for p in personas]
    fig = Figure(figsize=(7.6, 0.24 * len(personas) + 1.1), layout="constrained")
    ax = fig.subplots()
    ys = range(len(personas))
    ax.barh(ys, [r["rate"] for r in rates], color=colors, alpha=0.75, height=0.6)
    ax.errorbar([r["rate"] for r in rates], ys, fmt="none", ecolor="black", capsize=3, linewidth=1,
                xerr=[[r["rate"] - r["ci_low"] for r in rates], [r["ci_high"] - r["rate"] for r in rates]])
    for y, r in zip(ys, rates):
        ax.text(1.02, y, f"{r['k']}/{r['n']}", va="center", fontsize=7, transform=ax.get_yaxis_transform())
    ax.set_yticks(list(ys), [p + (" (source)" if p == report["source"] else "") for p in personas], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.xaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    ax.tick_params(axis="x", labelsize=7)
    ax.set_xlabel("completions with the marker (Wilson 95% interval)", fontsize=8)
    ax.set_title(title or f"regime: {report.get('regime', '?')}", fontsize=9)
    return fig, ax
