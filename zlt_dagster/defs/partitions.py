"""Partitions: a dynamic `sweep` dimension x a static `cell` dimension of grid positions.

Design (see docs/design.md): a sweep is added at run time (sensor or CLI) as a new dynamic partition key, with no
code change. Cells are positions in the sweep's own grid, `lr1_ep1` .. `lr5_ep5` (1-based, LRs and epochs in the
order the protocol lists them), so one static dimension serves every protocol, including a demo or finer LR grid
whose values differ from the paper's. The readable values (lr=5e-06_ep=20) name the storage keys and appear in
every materialization's metadata.
"""
from __future__ import annotations

from dagster import DynamicPartitionsDefinition, MultiPartitionKey, MultiPartitionsDefinition, StaticPartitionsDefinition

from ..core.protocol import Cell, Sweep

MAX_GRID = 5  # a MultiPartitionsDefinition has exactly 2 dimensions; the cell dimension is a fixed 5 x 5 grid
SWEEP_DIM, CELL_DIM = "sweep", "cell"

sweep_partitions = DynamicPartitionsDefinition(name="sweeps")
cell_partitions = StaticPartitionsDefinition(
    [f"lr{i}_ep{j}" for i in range(1, MAX_GRID + 1) for j in range(1, MAX_GRID + 1)])
sweep_cell_partitions = MultiPartitionsDefinition({SWEEP_DIM: sweep_partitions, CELL_DIM: cell_partitions})


class CellKeyError(ValueError):
    pass


def check_grid(sweep: Sweep) -> None:
    p = sweep.protocol
    if len(p.learning_rates) > MAX_GRID or len(p.epochs) > MAX_GRID:
        raise CellKeyError(f"sweep {sweep.sweep_id}: grid is {len(p.learning_rates)} LRs x {len(p.epochs)} epochs; "
                           f"the Dagster cell dimension holds at most {MAX_GRID} x {MAX_GRID} (split the sweep)")


def cell_position_key(sweep: Sweep, cell: Cell) -> str:
    p = sweep.protocol
    return f"lr{p.learning_rates.index(cell.lr) + 1}_ep{p.epochs.index(cell.epochs) + 1}"


def cell_from_position(sweep: Sweep, position_key: str) -> Cell:
    """`lr2_ep4` -> Cell(lr=<2nd LR of the sweep>, epochs=<4th epochs value>); errors if outside the sweep."""
    check_grid(sweep)
    try:
        lr_part, ep_part = position_key.split("_")
        i, j = int(lr_part.removeprefix("lr")), int(ep_part.removeprefix("ep"))
    except ValueError as e:
        raise CellKeyError(f"cell key {position_key!r} is not of the form lr<i>_ep<j>") from e
    p = sweep.protocol
    if not (1 <= i <= len(p.learning_rates) and 1 <= j <= len(p.epochs)):
        raise CellKeyError(f"cell {position_key} is outside sweep {sweep.sweep_id}'s grid "
                           f"({len(p.learning_rates)} LRs x {len(p.epochs)} epochs)")
    cell = Cell(p.learning_rates[i - 1], p.epochs[j - 1])
    if cell not in sweep.cells():
        raise CellKeyError(f"cell {position_key} ({cell.key}) is not one of sweep {sweep.sweep_id}'s chosen cells")
    return cell


def partition_keys_for(sweep: Sweep) -> list[MultiPartitionKey]:
    check_grid(sweep)
    return [MultiPartitionKey({SWEEP_DIM: sweep.sweep_id, CELL_DIM: cell_position_key(sweep, c)})
            for c in sweep.cells()]


def split_partition_key(partition_key) -> tuple[str, str]:
    """(sweep_id, cell position) from a multi-partition key, through keys_by_dimension (never string splitting)."""
    if not isinstance(partition_key, MultiPartitionKey):
        raise CellKeyError(f"expected a sweep x cell partition key, got {partition_key!r}")
    dims = partition_key.keys_by_dimension
    return dims[SWEEP_DIM], dims[CELL_DIM]
