"""The production step path, run here the way the cluster runs it (minus the GPU), for one tiny partition.

Real components, all on loopback and started by this test: PostgreSQL 15 (the Dagster instance: runs, event log,
dynamic partitions, the `zlt-gpu` concurrency pool), an S3 server (moto), and the project's code unmodified:
- the instance is dagster_prod/dagster.yaml byte for byte (PostgreSQL from DAGSTER_PG_*, K8sRunLauncher with
  in-cluster config, queued coordinator, pools); pods get it as the `zlt-dagster-instance` ConfigMap;
- the code is the production Definitions (ZLT_DEPLOYMENT=production, S3 store, k8s_job_executor), loaded in each
  pod from the module code pointer, as the user-code deployment serves it;
- the run is created in PostgreSQL and handed to the production K8sRunLauncher (the daemon's part after dequeue;
  the queue itself is skipped); the launcher builds the run-worker Job, whose pod runs
  `dagster api execute_run ...`; its k8s_job_executor builds one Job per step, whose pod runs
  `dagster api execute_step` with the serialized ExecuteStepArgs in DAGSTER_COMPRESSED_EXECUTE_STEP_ARGS.
What stands in for Kubernetes (no cluster here): local_k8s.LocalKubernetes, an HTTPS API server for the batch/v1
Job calls plus a kubelet that runs each Job's container as a local process with the env, volumes and
read-only root the manifest asks for (see local_k8s.py for what it does not reproduce: uid, GPU, cgroups).

Two runs, as a user would launch them: `onpolicy_data` for the sweep partition (sweep_data_job, one asset), then
`cell_job` (adapter, completions, marker_rates, arc_scores) for one cell. Checked: both runs succeed in the
PostgreSQL event log; each step ran in its own step pod (its own process, Job built by dagster-k8s with the GPU
request where the asset asks for one; step Jobs created by the run worker with its service-account token); the
GPU steps' `zlt-gpu` pool has the instance's limit and no slot left claimed; the materializations are in
PostgreSQL; every artifact is in S3 and its manifest verifies; no credential value (S3 keys, PostgreSQL password)
appears in the event log, the run records, any Job manifest or any container log.

What it caught when first run: the production Compute's fixed work_dir /tmp/zlt does not exist in a fresh pod
(the adapter step failed with FileNotFoundError; now the system temp dir), and dagster_prod/dagster.yaml without
`scheme` makes SQLAlchemy 2.1 load psycopg 3, which is not installed (`_check_pg_driver` names the fix).

Settings the shipped k8s/configmap.yaml does not carry and this test adds to the cluster's `zlt-config`:
ZLT_DEVICE=cpu (no GPU here) and DAGSTER_PG_HOST/PORT/DB/USER (dagster_prod/dagster.yaml reads them from the
environment; the Helm chart instead renders them into the instance, so only a deployment without the chart
needs them in the ConfigMap).
"""
from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from local_k8s import PG_BIN, LocalKubernetes, image_env, postgres_server
from loopback import FOREIGN_AWS_VARS, moto_s3_server

pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(not (PG_BIN / "initdb").exists(),
                       reason=f"PostgreSQL 15 server binaries not found at {PG_BIN} (needed for the real instance)"),
]

REPO = Path(__file__).resolve().parents[2]
IMAGE = "registry.example/zlt-dagster:test"
BUCKET = "zlt-prod-step"
ACCESS_KEY = "AKIAZLTPRODSTEP00001"
SECRET_KEY = "zlt-prod-step-secret-DO-NOT-LEAK-" + uuid.uuid4().hex
RUN_TIMEOUT_S = 240
GPU_STEPS = {"onpolicy_data", "adapter", "completions", "arc_scores"}
CELL_STEPS = ["adapter", "completions", "marker_rates", "arc_scores"]


def _instance_yaml() -> str:
    return (REPO / "dagster_prod" / "dagster.yaml").read_text()


def _check_pg_driver(text: str) -> None:
    """A clearer message than the ImportError it prevents: SQLAlchemy 2.1 made `postgresql://` mean the psycopg 3
    driver; dagster-postgres builds that URL unless `postgres_db.scheme` says otherwise, and brings only psycopg2
    (so does the image)."""
    import importlib.util

    import sqlalchemy

    db = yaml.safe_load(text)["storage"]["postgres"]["postgres_db"]
    major_minor = tuple(int(x) for x in sqlalchemy.__version__.split(".")[:2])
    if (db.get("scheme") in (None, "postgresql") and major_minor >= (2, 1)
            and importlib.util.find_spec("psycopg") is None):
        pytest.fail(f"dagster_prod/dagster.yaml: storage.postgres.postgres_db has no `scheme`, so with SQLAlchemy "
                    f"{sqlalchemy.__version__} every Dagster process (daemon, webserver, run and step pods) would "
                    f"load the psycopg 3 driver, which is not installed: set `scheme: postgresql+psycopg2` there "
                    f"(and postgresql.postgresqlScheme in k8s/helm/values.yaml)")


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    """PostgreSQL + S3 + the local Kubernetes stand-in, and the test process's env as the daemon's would be."""
    from zlt_dagster.storage import S3Store

    instance_yaml = _instance_yaml()
    for var in FOREIGN_AWS_VARS:
        monkeypatch.delenv(var, raising=False)
    with moto_s3_server() as endpoint:
        with postgres_server() as pg:
            shipped = yaml.safe_load((REPO / "k8s" / "configmap.yaml").read_text())["data"]
            overrides = {"ZLT_S3_BUCKET": BUCKET, "ZLT_S3_PREFIX": f"t-{uuid.uuid4().hex[:8]}",
                         "ZLT_S3_ENDPOINT_URL": endpoint, "ZLT_ARC_SOURCE": "sample"}
            assert set(overrides) <= set(shipped), "k8s/configmap.yaml no longer has these keys"
            extra = {"ZLT_DEVICE": "cpu", "DAGSTER_PG_HOST": pg.host, "DAGSTER_PG_PORT": str(pg.port),
                     "DAGSTER_PG_DB": pg.db, "DAGSTER_PG_USER": pg.user}
            zlt_config = {**{k: str(v) for k, v in shipped.items()}, **overrides, **extra}
            env, workdir = image_env(REPO / "docker" / "Dockerfile", str(Path(sys.executable).parent))
            kube = LocalKubernetes(
                tmp_path / "kube", image_env=env, workdir=workdir,
                config_maps={"zlt-config": zlt_config, "zlt-dagster-instance": {"dagster.yaml": instance_yaml}},
                secrets_={"zlt-s3-credentials": {"AWS_ACCESS_KEY_ID": ACCESS_KEY,
                                                 "AWS_SECRET_ACCESS_KEY": SECRET_KEY},
                          "zlt-postgres": {"postgresql-password": pg.password}})
            with kube:
                # the test process plays the daemon: same instance yaml, same PostgreSQL, S3 creds for checking
                home = tmp_path / "dagster_home"
                home.mkdir()
                (home / "dagster.yaml").write_text(instance_yaml)
                for k, v in {**zlt_config, "DAGSTER_HOME": str(home), "DAGSTER_PG_PASSWORD": pg.password,
                             "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                             "AWS_CONFIG_FILE": str(tmp_path / "none"),
                             "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
                             "AWS_EC2_METADATA_DISABLED": "true"}.items():
                    monkeypatch.setenv(k, v)
                store = S3Store(BUCKET, prefix=overrides["ZLT_S3_PREFIX"], endpoint_url=endpoint,
                                region_name=zlt_config["AWS_REGION"], connect_timeout=2, read_timeout=30,
                                max_attempts=2)
                store.create_bucket_if_missing()
                yield {"pg": pg, "kube": kube, "store": store, "home": home, "tmp": tmp_path}


def _launcher(kube: LocalKubernetes, instance, tmp_path: Path):
    """The production K8sRunLauncher from dagster_prod/dagster.yaml; only how it finds the API server differs
    (a kubeconfig here, in-cluster config in the daemon pod). The instance ref it hands to pods is unchanged."""
    from dagster._config import process_config
    from dagster_k8s import K8sRunLauncher

    cfg = yaml.safe_load((REPO / "dagster_prod" / "dagster.yaml").read_text())["run_launcher"]
    assert cfg["class"] == "K8sRunLauncher" and cfg["config"]["load_incluster_config"] is True
    raw = {**cfg["config"], "load_incluster_config": False,
           "kubeconfig_file": str(kube.kubeconfig(tmp_path / "kubeconfig"))}
    result = process_config(K8sRunLauncher.config_type(), raw)
    assert result.success, result.errors
    launcher = K8sRunLauncher.from_config_value(None, result.value)
    launcher.register_instance(instance)
    return launcher


def _launch_and_wait(instance, launcher, kube: LocalKubernetes, job_def, asset_keys, partition_key, partitions_def):
    """Create the run in PostgreSQL (as the webserver does for a materialization), launch it (as the daemon does
    after dequeue), wait for the run worker pod to finish. Returns the finished DagsterRun."""
    from dagster import AssetKey, DagsterEvent, DagsterEventType
    from dagster._core.definitions.reconstruct import ReconstructableRepository
    from dagster._core.launcher import LaunchRunContext

    origin = (ReconstructableRepository.for_module("zlt_dagster.defs.definitions", "defs", container_image=IMAGE)
              .get_reconstructable_job(job_def.name).get_python_origin())
    tags = {**job_def.tags, **partitions_def.get_tags_for_partition_key(partition_key)}
    run = instance.create_run_for_job(job_def=job_def, run_config={}, tags=tags, job_code_origin=origin,
                                      asset_selection={AssetKey(k) for k in asset_keys})
    instance.report_dagster_event(DagsterEvent(event_type_value=DagsterEventType.RUN_STARTING.value,
                                               job_name=run.job_name), run_id=run.run_id)
    launcher.launch_run(LaunchRunContext(dagster_run=instance.get_run_by_id(run.run_id), workspace=None))

    deadline = time.monotonic() + RUN_TIMEOUT_S
    worker = None
    while time.monotonic() < deadline:
        worker = next((p for p in kube.jobs("run_worker") if run.run_id in json.dumps(p.manifest["metadata"])),
                      None)
        if worker is not None and worker.returncode() is not None:
            break
        time.sleep(0.5)
    assert worker is not None, "the launcher created no run-worker Job"
    finished = instance.get_run_by_id(run.run_id)
    if worker.returncode() != 0 or not finished.is_finished:
        logs = "\n".join(f"--- {p.name} (rc={p.returncode()})\n{p.log()[-6000:]}" for p in kube.jobs())
        pytest.fail(f"run {run.run_id} ended {finished.status}; run worker rc={worker.returncode()}\n{logs}")
    return finished


def test_production_step_path_runs_one_partition(cluster):
    from dagster import AssetKey, DagsterEventType, DagsterInstance, DagsterRunStatus
    from dagster._serdes import serialize_value

    from zlt_dagster import steps
    from zlt_dagster.steps import layout
    from zlt_dagster.core.protocol import TINY, Sweep
    from zlt_dagster.defs.definitions import build_definitions
    from zlt_dagster.defs.partitions import (add_partitions, cell_of, partition_keys_for, split_partition_key,
                                             sweep_cell_partitions, sweep_partitions)

    _check_pg_driver(_instance_yaml())
    t0 = time.monotonic()
    kube, store = cluster["kube"], cluster["store"]
    instance = DagsterInstance.get()  # DAGSTER_HOME: dagster_prod/dagster.yaml -> this PostgreSQL
    try:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        launcher = _launcher(kube, instance, cluster["tmp"])
        defs = build_definitions("production")
        assert defs.resolve_job_def("cell_job").executor_def.name == "zlt_k8s_job_executor"

        # a sweep, registered as the sensor/CLI does: config in S3, a partition of the dynamic dimension
        sweep = Sweep(TINY, base_model="tiny", source_persona="villain").validate()
        steps.register_sweep(store, sweep)
        add_partitions(instance, sweep)
        cell_key = partition_keys_for(sweep)[0]  # lr=0.001_ep=1: the quickest cell
        cell = cell_of(sweep, split_partition_key(cell_key)[1])

        data_run = _launch_and_wait(instance, launcher, kube, defs.resolve_job_def("sweep_data_job"),
                                    ["onpolicy_data"], sweep.sweep_id, sweep_partitions)
        cell_run = _launch_and_wait(instance, launcher, kube, defs.resolve_job_def("cell_job"), CELL_STEPS,
                                    cell_key, sweep_cell_partitions)
        elapsed = time.monotonic() - t0

        # --- both runs succeeded, in the PostgreSQL event log ---
        expected = {data_run.run_id: ["onpolicy_data"], cell_run.run_id: CELL_STEPS}
        for run in (data_run, cell_run):
            assert run.status == DagsterRunStatus.SUCCESS, run.status
            events = [e.dagster_event for e in instance.all_logs(run.run_id) if e.dagster_event]
            types = [e.event_type for e in events]
            assert DagsterEventType.RUN_SUCCESS in types and DagsterEventType.RUN_FAILURE not in types
            assert {e.step_key for e in events if e.event_type == DagsterEventType.STEP_SUCCESS} == set(
                expected[run.run_id])
            # each step ran in its own step worker (a process of its own, started by its Job's pod)
            workers = {e.step_key: e.event_specific_data.metadata["pid"].value for e in events
                       if e.event_type == DagsterEventType.STEP_WORKER_STARTED}
            assert set(workers) == set(expected[run.run_id]) and len(set(workers.values())) == len(workers)
            starting = [e.message for e in events if e.event_type == DagsterEventType.STEP_WORKER_STARTING]
            assert all("in Kubernetes job dagster-step-" in m for m in starting) and len(starting) == len(workers)

        # --- the materializations are in PostgreSQL ---
        assert instance.get_materialized_partitions(AssetKey("onpolicy_data")) == {sweep.sweep_id}
        for name in CELL_STEPS:
            assert instance.get_materialized_partitions(AssetKey(name)) == {cell_key}, name
            record = instance.get_latest_materialization_event(AssetKey(name))
            assert record.run_id == cell_run.run_id
            meta = record.asset_materialization.metadata
            assert meta["cell"].value == cell.key and meta["artifact"].value.startswith(f"s3://{BUCKET}/")

        # GPU steps went through the instance's `zlt-gpu` pool (limit from the instance yaml) and gave slots back
        pool = instance.event_log_storage.get_concurrency_info("zlt-gpu")
        assert pool.limit == 4 and not pool.claimed_slots and not pool.pending_steps, pool

        # --- the Jobs dagster-k8s built, and the pods that ran them ---
        step_pods = {p.manifest["metadata"]["labels"]["dagster/op"]: p for p in kube.jobs("step_worker")}
        assert set(step_pods) == {"onpolicy_data", *CELL_STEPS} and len(kube.jobs("run_worker")) == 2
        for op, pod in step_pods.items():
            c = pod.manifest["spec"]["template"]["spec"]["containers"][0]
            assert c["args"] == ["dagster", "api", "execute_step"] and c["image"] == IMAGE
            env = {e["name"] for e in c["env"]}
            assert {"DAGSTER_COMPRESSED_EXECUTE_STEP_ARGS", "DAGSTER_RUN_JOB_NAME", "DAGSTER_RUN_STEP_KEY"} <= env
            gpu = c["resources"].get("limits", {}).get("nvidia.com/gpu")
            assert (gpu == "1") == (op in GPU_STEPS), (op, c["resources"])
            assert pod.returncode() == 0
        for pod in kube.jobs("run_worker"):
            assert pod.manifest["spec"]["template"]["spec"]["containers"][0]["args"][:3] == [
                "dagster", "api", "execute_run"]
        # step Jobs were created by the run workers, through their service-account token (in-cluster config)
        assert {who for m, path, who in kube.requests if m == "POST"} == {"client", "service-account"}
        assert sum(1 for m, _, who in kube.requests if m == "POST" and who == "service-account") == len(step_pods)
        assert not kube.unhandled, kube.unhandled

        # --- every artifact is in S3 and its manifest verifies (sha256 + size of every file) ---
        prefixes = [layout.onpolicy_prefix(sweep.sweep_id)] + [layout.cell_prefix(sweep.sweep_id, cell, a)
                                                               for a in layout.CELL_ARTIFACTS]
        for i, prefix in enumerate(prefixes):
            manifest = store.read_manifest(prefix)
            assert manifest["files"], prefix
            store.fetch_artifact(prefix, cluster["tmp"] / "verify" / str(i))
        assert store.read_json(layout.sweep_config_key(sweep.sweep_id)) == sweep.to_dict()

        # --- no credential value anywhere: event log, run records, Job manifests, container logs ---
        secrets_ = {"S3 access key": ACCESS_KEY, "S3 secret key": SECRET_KEY,
                    "PostgreSQL password": cluster["pg"].password}
        places = {f"event log of {r.run_id}": "\n".join(serialize_value(e) for e in instance.all_logs(r.run_id))
                  for r in (data_run, cell_run)}
        places.update({f"run record {r.run_id}": serialize_value(instance.get_run_by_id(r.run_id))
                       for r in (data_run, cell_run)})
        places.update({f"Job {p.job_name}": json.dumps(p.manifest) for p in kube.jobs()})
        places.update({f"log of pod {p.name}": p.log() for p in kube.jobs()})
        leaks = [f"{what} in {where}" for where, text in places.items() for what, v in secrets_.items() if v in text]
        assert leaks == []
        print(f"\nproduction step path: 2 runs, {len(step_pods)} step pods, {elapsed:.1f} s; pod wall times: "
              + ", ".join(f"{p.manifest['metadata']['labels'].get('dagster/op', 'run worker')} "
                          f"{p.ended - p.started:.1f} s" for p in kube.jobs()))
    finally:
        instance.dispose()
