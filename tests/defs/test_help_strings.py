"""Every config field a user can set says what it is: protocol and sweep fields (help), resources and run config
(description), and every environment variable (settings.VARIABLES, listed in README's table)."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from zlt_dagster import settings
from zlt_dagster.core import protocol as P
from zlt_dagster.defs.assets import ComparisonConfig
from zlt_dagster.defs.resources import ArtifactStore, Compute

REPO = Path(__file__).resolve().parents[2]


def test_every_protocol_and_sweep_field_has_help():
    missing = [f"{c.__name__}.{f.name}" for c in (P.LoraSpec, P.TrainSpec, P.DataSpec, P.EvalSpec,
                                                   P.RegimeThresholds, P.Protocol, P.Sweep)
               for f in dataclasses.fields(c) if not f.metadata.get("help")]
    assert not missing


def test_every_resource_and_run_config_field_has_a_description():
    missing = [f"{c.__name__}.{name}" for c in (ArtifactStore, Compute, ComparisonConfig)
               for name, f in c.model_fields.items() if not f.description]
    assert not missing


def test_every_environment_variable_is_in_settings_and_the_readme():
    """Only settings.py reads ZLT_* variables; each one it knows is in README's table."""
    readers = [str(p.relative_to(REPO)) for p in (REPO / "zlt_dagster").rglob("*.py")
               if p.name != "settings.py" and re.search(r"os\.environ(\.get)?[\[(]\s*[\"']ZLT_", p.read_text())]
    assert not readers, f"read ZLT_* through zlt_dagster/settings.py, not os.environ: {readers}"
    used = set()
    for p in (REPO / "zlt_dagster").rglob("*.py"):
        used |= set(re.findall(r"settings\.get(?:_int|_bool)?\(\s*\"(\w+)\"", p.read_text()))
    assert used <= set(settings.VARIABLES), used - set(settings.VARIABLES)
    assert settings.markdown_table() in (REPO / "README.md").read_text()  # README's table is this one
