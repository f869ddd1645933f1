"""Dagster-level fixtures: a temporary instance, a local artifact store, tiny sweeps registered in both."""
from __future__ import annotations

import pytest

from zlt_dagster import steps
from zlt_dagster.core.protocol import TINY, Sweep
from zlt_dagster.defs.partitions import add_partitions
from zlt_dagster.defs.resources import ArtifactStore, Compute


@pytest.fixture
def dagster_instance():
    from dagster import instance_for_test

    with instance_for_test() as instance:
        yield instance


@pytest.fixture
def resources(tmp_path):
    return {"store": ArtifactStore(kind="local", local_root=str(tmp_path / "artifacts")),
            "compute": Compute(device="cpu", arc_source="sample")}


@pytest.fixture
def register(dagster_instance, resources):
    """register(source_persona=..., **sweep fields) -> Sweep, added to the store and as a dynamic partition."""
    def _register(**kw) -> Sweep:
        sweep = Sweep(TINY, base_model="tiny", **kw).validate()
        steps.register_sweep(resources["store"].get_store(), sweep)
        add_partitions(dagster_instance, sweep)
        return sweep
    return _register
