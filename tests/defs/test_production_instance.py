"""Production instance config (dagster_prod/dagster.yaml) against Dagster's own instance schema, its agreement
with the Helm values that render the deployed instance, and the production Definitions chosen by environment."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INSTANCE_YAML = REPO / "dagster_prod" / "dagster.yaml"
HELM_VALUES = REPO / "k8s" / "helm" / "values.yaml"


@pytest.fixture
def pg_env(monkeypatch):
    for k, v in {"DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_PORT": "5432", "DAGSTER_PG_DB": "dagster",
                 "DAGSTER_PG_USER": "dagster", "DAGSTER_PG_PASSWORD": "not-a-real-password"}.items():
        monkeypatch.setenv(k, v)


def test_instance_yaml_passes_dagster_instance_schema(tmp_path, pg_env):
    from dagster._core.instance.config import dagster_instance_config

    shutil.copy(INSTANCE_YAML, tmp_path / "dagster.yaml")
    config, custom_class = dagster_instance_config(str(tmp_path))
    assert custom_class is None
    assert set(config["storage"]) == {"postgres"}
    assert config["run_launcher"]["class"] == "K8sRunLauncher"
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert config["run_monitoring"]["enabled"] and config["run_retries"]["enabled"]


def test_instance_yaml_holds_no_secret_values():
    text = INSTANCE_YAML.read_text()
    pg = yaml.safe_load(text)["storage"]["postgres"]["postgres_db"]
    assert pg["password"] == {"env": "DAGSTER_PG_PASSWORD"}
    assert "AWS_SECRET_ACCESS_KEY" not in text


def test_instance_yaml_configures_each_component(tmp_path, pg_env):
    """Each configured class loads from its own config schema (what `DagsterInstance.from_config` would do),
    without connecting to PostgreSQL or Kubernetes."""
    from dagster._config import process_config
    from dagster._core.run_coordinator import QueuedRunCoordinator
    from dagster_postgres import DagsterPostgresStorage

    cfg = yaml.safe_load(INSTANCE_YAML.read_text())
    coordinator = process_config(QueuedRunCoordinator.config_type(), cfg["run_coordinator"]["config"])
    assert coordinator.success, coordinator.errors
    assert {"key": "zlt/gpu", "value": "true", "limit": 4} in cfg["concurrency"]["runs"]["tag_concurrency_limits"]
    pg = process_config(DagsterPostgresStorage.config_type(), cfg["storage"]["postgres"])
    assert pg.success, pg.errors


def test_helm_values_agree_with_instance_yaml():
    inst = yaml.safe_load(INSTANCE_YAML.read_text())
    values = yaml.safe_load(HELM_VALUES.read_text())
    daemon = values["dagsterDaemon"]
    assert daemon["runCoordinator"]["type"] == "QueuedRunCoordinator"
    runs = values["concurrency"]["runs"]
    assert runs["maxConcurrentRuns"] == inst["concurrency"]["runs"]["max_concurrent_runs"]
    assert runs["tagConcurrencyLimits"] == inst["concurrency"]["runs"]["tag_concurrency_limits"]
    mon = daemon["runMonitoring"]
    for helm_key, inst_key in [("startTimeoutSeconds", "start_timeout_seconds"),
                               ("maxRuntimeSeconds", "max_runtime_seconds"),
                               ("maxResumeRunAttempts", "max_resume_run_attempts"),
                               ("pollIntervalSeconds", "poll_interval_seconds")]:
        assert mon[helm_key] == inst["run_monitoring"][inst_key], helm_key
    assert daemon["runRetries"]["maxRetries"] == inst["run_retries"]["max_retries"]
    assert values["concurrency"]["pools"]["defaultLimit"] == inst["concurrency"]["pools"]["default_limit"]
    rl = values["runLauncher"]["config"]["k8sRunLauncher"]
    assert rl["jobNamespace"] == inst["run_launcher"]["config"]["job_namespace"]
    assert [s["name"] for s in rl["envSecrets"]] == inst["run_launcher"]["config"]["env_secrets"]
    assert values["global"]["postgresqlSecretName"] == inst["run_launcher"]["config"]["postgres_password_secret"]


def test_production_definitions_selected_by_environment(monkeypatch):
    from zlt_dagster.defs import definitions

    monkeypatch.setenv("ZLT_DEPLOYMENT", "production")
    monkeypatch.setenv("ZLT_S3_BUCKET", "zlt-test-bucket")
    assert definitions.deployment() == "production"
    defs = definitions.build_definitions()
    job = defs.resolve_job_def("cell_job")
    assert job.executor_def.name == "zlt_k8s_job_executor"
    assert defs.resolve_job_def("__ASSET_JOB").executor_def.name == "zlt_k8s_job_executor"
    monkeypatch.setenv("ZLT_DEPLOYMENT", "local")
    assert definitions.build_definitions().resolve_job_def("cell_job").executor_def.name == "in_process"
    monkeypatch.setenv("ZLT_DEPLOYMENT", "staging")
    with pytest.raises(ValueError, match="ZLT_DEPLOYMENT"):
        definitions.deployment()


def test_production_executor_config_is_valid_and_env_driven(monkeypatch):
    from dagster._config import process_config

    from zlt_dagster.defs.production import executor_config, production_executor

    monkeypatch.setenv("ZLT_K8S_NAMESPACE", "zlt-staging")
    cfg = executor_config()
    assert cfg["job_namespace"] == "zlt-staging"
    executor = production_executor()
    result = process_config(executor.config_schema.config_type, {})
    assert result.success, result.errors
    resolved = executor.config_schema.resolve_config(result.value)
    assert resolved.success, resolved.errors
    assert resolved.value["config"]["job_namespace"] == "zlt-staging"
