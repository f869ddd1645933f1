"""The one way a step's summary becomes a MaterializeResult: its keys ARE the metadata names (never renamed)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from dagster import MaterializeResult, MetadataValue

from ..core.protocol import Cell, Sweep
from ..storage import display_path


def _value(key: str, value: Any):
    if key == "artifact" or key.endswith("_uri"):
        # a store location as a path a person copies (a local path or s3://), never a file:// link: browsers do
        # not open those from the UI's http page
        return MetadataValue.path(display_path(value))
    if isinstance(value, (dict, list, tuple)):
        return MetadataValue.json(list(value) if isinstance(value, tuple) else value)
    return value


def metadata(summary: Mapping[str, Any], keys: Sequence[str], flatten: Sequence[str] = ()) -> dict[str, Any]:
    """{key: summary[key]} for ``keys`` (absent or None ones left out: never invented), plus every entry of each
    dict named in ``flatten`` under its own name; store locations as paths, dicts and lists as JSON."""
    out = {k: _value(k, summary[k]) for k in keys if summary.get(k) is not None}
    for name in flatten:
        out.update({k: _value(k, v) for k, v in summary[name].items() if v is not None})
    return out


def cell_metadata(sweep: Sweep, cell: Cell | None = None) -> dict[str, Any]:
    """What every materialization of a sweep (and cell) shows first: which sweep, cell, lr, epochs."""
    meta = {"sweep": sweep.sweep_id}
    if cell is not None:
        meta.update({"cell": cell.key, "lr": cell.lr, "epochs": cell.epochs, "source_persona": sweep.source_persona,
                     "seed": sweep.seed, "protocol": sweep.protocol.name})
    return meta


def to_result(summary: Mapping[str, Any], keys: Sequence[str], *, sweep: Sweep, cell: Cell | None = None,
              flatten: Sequence[str] = (), **extra) -> MaterializeResult:
    """The MaterializeResult of one step: cell_metadata, the summary's ``keys`` (see `metadata`), then ``extra``
    (presentation only: a markdown table, an inline image)."""
    return MaterializeResult(metadata={**cell_metadata(sweep, cell), **metadata(summary, keys, flatten), **extra})
