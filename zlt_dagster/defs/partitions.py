"""Partitions, and the one codec between cells and partition keys.

Design (docs/design.md, "Readable partition keys"): a dynamic `sweep` dimension x a dynamic `cell` dimension. A
cell's key is its storage key, `Cell.key` (`lr=5e-06_ep=20`): what a user picks in the UI says the learning rate
and epochs, and is the folder its artifacts live in (sweeps/<id>/cells/lr=5e-06_ep=20/). Both dimensions grow at
run time, with no code change: registering a sweep (registry sensor, `zlt run`) adds its id and its grid's cell
keys (`add_requests`). Cells are shared between sweeps of one grid; a sweep whose grid holds another cell key
rejects that partition before any work (CellKeyError naming the sweep's cells).

Encoding and decoding go through a mapping built from the protocol's axes (`sweep.cells()`), never by parsing a
key: `partition_key(sweep, cell)` and `cell_of(sweep, key)`; keys are read with MultiPartitionKey.keys_by_dimension.
"""
from __future__ import annotations

from dagster import (
    AddDynamicPartitionsRequest, DynamicPartitionsDefinition, MultiPartitionKey, MultiPartitionsDefinition,
)

from ..core.protocol import Cell, Sweep

SWEEP_DIM, CELL_DIM = "sweep", "cell"

sweep_partitions = DynamicPartitionsDefinition(name="sweeps")
cell_partitions = DynamicPartitionsDefinition(name="cells")
sweep_cell_partitions = MultiPartitionsDefinition({SWEEP_DIM: sweep_partitions, CELL_DIM: cell_partitions})


class CellKeyError(ValueError):
    """A partition key that is not one of its sweep's cells (or not a sweep x cell key at all)."""


def cell_key(cell: Cell) -> str:
    """The cell dimension's key of ``cell``: its storage key, e.g. ``lr=5e-06_ep=20``."""
    return cell.key


def partition_key(sweep: Sweep, cell: Cell) -> MultiPartitionKey:
    """The sweep x cell key of one of ``sweep``'s cells."""
    return MultiPartitionKey({SWEEP_DIM: sweep.sweep_id, CELL_DIM: cell_key(cell)})


def partition_keys_for(sweep: Sweep) -> list[MultiPartitionKey]:
    """Every partition key of ``sweep``, in its cell order (LRs, then epochs, as the protocol lists them)."""
    return [partition_key(sweep, c) for c in sweep.cells()]


def split_partition_key(key) -> tuple[str, str]:
    """(sweep_id, cell key) of a multi-partition key (a MultiPartitionKey or its string form), read through
    keys_by_dimension. Raises CellKeyError for a key of another shape."""
    if isinstance(key, str) and not isinstance(key, MultiPartitionKey):
        try:
            key = sweep_cell_partitions.get_partition_key_from_str(key)
        except Exception as e:  # dagster raises CheckError for a key without the dimensions
            raise CellKeyError(f"expected a sweep x cell partition key, got {key!r}") from e
    if not isinstance(key, MultiPartitionKey):
        raise CellKeyError(f"expected a sweep x cell partition key, got {key!r}")
    dims = key.keys_by_dimension
    return dims[SWEEP_DIM], dims[CELL_DIM]


def cell_of(sweep: Sweep, key: str) -> Cell:
    """The cell of ``sweep`` whose cell key is ``key`` (a cell dimension key, not a multi-partition key).
    Raises CellKeyError naming the sweep's cells when ``key`` is not one of them."""
    cells = {cell_key(c): c for c in sweep.cells()}
    if key not in cells:
        raise CellKeyError(f"cell {key} is not one of sweep {sweep.sweep_id}'s cells ({', '.join(cells)})")
    return cells[key]


def add_requests(instance, sweeps: list[Sweep]) -> list[AddDynamicPartitionsRequest]:
    """The dynamic-partition requests that make ``sweeps`` (their ids and their cells) pickable, for what the
    ``instance`` lacks; [] when it has them all. Cells keep the order their first sweep lists them in."""
    new_sweeps, new_cells = [], []
    for sweep in sweeps:
        if sweep.sweep_id not in new_sweeps and not instance.has_dynamic_partition(sweep_partitions.name,
                                                                                   sweep.sweep_id):
            new_sweeps.append(sweep.sweep_id)
        for c in sweep.cells():
            k = cell_key(c)
            if k not in new_cells and not instance.has_dynamic_partition(cell_partitions.name, k):
                new_cells.append(k)
    return [d.build_add_request(keys) for d, keys in ((sweep_partitions, new_sweeps), (cell_partitions, new_cells))
            if keys]


def add_partitions(instance, sweep: Sweep) -> None:
    """Add ``sweep``'s id and cells to the instance's dynamic partitions (what add_requests asks a sensor for)."""
    for request in add_requests(instance, [sweep]):
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
