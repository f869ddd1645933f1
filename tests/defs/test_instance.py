"""One instance configuration: `zlt` reads the file `dagster dev` reads from the same directory, and a file `zlt`
writes holds the same settings (run-queue limit included) as the repo's dagster.yaml."""
from __future__ import annotations

from pathlib import Path

import yaml

from zlt_dagster.defs import instance
from zlt_dagster.defs.instance import MAX_CONCURRENT_RUNS, WRITTEN_BY_ZLT, instance_config, open_instance

REPO = Path(__file__).resolve().parents[2]


def _max_runs(inst) -> int:
    return inst.run_coordinator.get_run_queue_config().max_concurrent_runs


def test_repo_file_is_the_module_config():
    assert yaml.safe_load((REPO / "dagster.yaml").read_text()) == instance_config(".dagster_home")


def test_without_dagster_home_zlt_reads_the_repo_file(tmp_path, monkeypatch):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    (tmp_path / "dagster.yaml").write_text((REPO / "dagster.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    inst, path = open_instance()
    with inst:
        assert path == tmp_path / "dagster.yaml" and _max_runs(inst) == MAX_CONCURRENT_RUNS
    assert (tmp_path / ".dagster_home" / "storage").is_dir()  # where `dagster dev` from here stores runs
    assert not (tmp_path / ".dagster_home" / "dagster.yaml").exists()  # no second file


def test_with_dagster_home_zlt_writes_and_repairs_its_file(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.chdir(REPO)  # the repo's dagster.yaml is ignored, as `dagster dev` ignores it
    inst, path = open_instance()
    with inst:
        assert path == home / "dagster.yaml" and _max_runs(inst) == MAX_CONCURRENT_RUNS
    # a file an older zlt wrote without the run-queue limit is rewritten; a person's own file is left alone
    old = {k: v for k, v in instance_config(home).items() if k != "run_coordinator"}
    path.write_text(WRITTEN_BY_ZLT + yaml.safe_dump(old))
    instance.resolve_instance()
    assert yaml.safe_load(path.read_text()) == instance_config(home)
    path.write_text("# mine\n" + yaml.safe_dump(old))
    instance.resolve_instance()
    assert yaml.safe_load(path.read_text()) == old
