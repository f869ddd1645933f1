"""Kubernetes specs, offline: the kustomize base under k8s/, the secret templates, and the Job/Pod specs that
dagster-k8s builds for every asset step and for the run worker, from the project's own production Definitions and
instance config. All validate against the Kubernetes 1.30 schema (kubernetes-validate, strict: unknown fields fail)
and meet the `restricted` Pod Security Standard the `zlt` namespace enforces. No cluster is contacted: the
dagster-k8s clients load a kubeconfig that points at a closed loopback port and are never called.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")

REPO = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.30.0"
IMAGE = "registry.example/zlt-dagster:test"
GPU_ASSETS = {"onpolicy_data", "adapter", "completions", "arc_scores", "base_arc_scores"}
CPU_ASSETS = {"marker_rates", "compiled_results", "heatmap", "cell_comparison"}
ALLOWED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                        "projected", "secret"}
POD_BEARING = {"Pod": ("spec",), "Job": ("spec", "template", "spec"), "Deployment": ("spec", "template", "spec"),
               "StatefulSet": ("spec", "template", "spec"), "DaemonSet": ("spec", "template", "spec"),
               "CronJob": ("spec", "jobTemplate", "spec", "template", "spec")}


def validate_k8s(obj: dict) -> None:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        raise AssertionError(f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}: "
                             f"{'.'.join(map(str, e.path))}: {e.message}") from e


def restricted_violations(pod: dict, where: str) -> list[str]:
    """Pod Security Standard `restricted` (v1.30) plus this project's read-only-root rule, on a camelCase PodSpec."""
    out = []
    psc = pod.get("securityContext") or {}
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            out.append(f"{where}: {flag}")
    for v in pod.get("volumes") or []:
        kinds = set(v) - {"name"}
        if not kinds <= ALLOWED_VOLUME_TYPES:
            out.append(f"{where}: volume {v['name']} of type {kinds - ALLOWED_VOLUME_TYPES}")
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    containers = (pod.get("containers") or []) + (pod.get("initContainers") or [])
    if not containers:
        out.append(f"{where}: no containers")
    mounts_of_tmp = {v["name"] for v in pod.get("volumes") or [] if "emptyDir" in v}
    for c in containers:
        sc = c.get("securityContext") or {}
        cw = f"{where}/{c.get('name')}"
        if not (sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True):
            out.append(f"{cw}: runAsNonRoot is not true")
        if sc.get("runAsUser", psc.get("runAsUser")) in (0, None):
            out.append(f"{cw}: runAsUser unset or 0")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{cw}: allowPrivilegeEscalation is not false")
        if sc.get("privileged"):
            out.append(f"{cw}: privileged")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{cw}: capabilities do not drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"{cw}: adds capabilities {caps['add']}")
        if (sc.get("seccompProfile") or {}).get("type", pod_seccomp) not in ("RuntimeDefault", "Localhost"):
            out.append(f"{cw}: seccompProfile is not RuntimeDefault")
        if sc.get("readOnlyRootFilesystem") is not True:
            out.append(f"{cw}: readOnlyRootFilesystem is not true")
        if not any(m["mountPath"] == "/tmp" and m["name"] in mounts_of_tmp for m in c.get("volumeMounts") or []):
            out.append(f"{cw}: no emptyDir at /tmp (the root filesystem is read-only)")
        if any(p.get("hostPort") for p in c.get("ports") or []):
            out.append(f"{cw}: hostPort")
    names = [v["name"] for v in pod.get("volumes") or []]
    if len(names) != len(set(names)):
        out.append(f"{where}: duplicate volume names {names}")
    return out


def pod_spec_of(obj: dict) -> dict | None:
    path = POD_BEARING.get(obj.get("kind"))
    if path is None:
        return None
    node = obj
    for key in path:
        node = node[key]
    return node


# --- the kustomize base -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kustomized() -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed (needed for `kubectl kustomize`)")
    out = subprocess.run(["kubectl", "kustomize", str(REPO / "k8s")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_kustomize_output_validates_against_k8s_1_30(kustomized):
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in kustomized)
    assert ("Namespace", "zlt") in kinds and ("Role", "zlt-dagster") in kinds, kinds
    for obj in kustomized:
        validate_k8s(obj)
        assert obj["kind"] == "Namespace" or obj["metadata"].get("namespace") == "zlt", obj["metadata"]
        assert obj["kind"] != "Secret", "secrets stay out of the kustomize base (templates only)"


def test_namespace_enforces_restricted_pod_security(kustomized):
    ns = next(d for d in kustomized if d["kind"] == "Namespace")
    for mode in ("enforce", "audit", "warn"):
        assert ns["metadata"]["labels"][f"pod-security.kubernetes.io/{mode}"] == "restricted"


def test_every_pod_in_kustomize_output_is_restricted(kustomized):
    problems = [p for d in kustomized if (spec := pod_spec_of(d)) is not None
                for p in restricted_violations(spec, f"{d['kind']}/{d['metadata']['name']}")]
    assert problems == []


def test_rbac_is_least_privilege(kustomized):
    role = next(d for d in kustomized if d["kind"] == "Role")
    grants = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
              for v in rule["verbs"]}
    # exactly what dagster_k8s.client calls for the run launcher and k8s_job_executor
    assert grants == {("batch", "jobs", v) for v in ("create", "get", "list", "delete")} | {
        ("batch", "jobs/status", "get"), ("", "pods/log", "get"), ("", "events", "list")} | {
        ("", "pods", v) for v in ("get", "list", "delete")}
    assert not any(d["kind"] in ("ClusterRole", "ClusterRoleBinding") for d in kustomized)
    binding = next(d for d in kustomized if d["kind"] == "RoleBinding")
    assert [s["name"] for s in binding["subjects"]] == ["zlt-dagster"]
    step_sa = next(d for d in kustomized if d["kind"] == "ServiceAccount" and d["metadata"]["name"] == "zlt-step")
    assert step_sa["automountServiceAccountToken"] is False


def test_secret_templates_are_valid_and_hold_no_values():
    templates = sorted((REPO / "k8s" / "secrets").glob("*.template.yaml"))
    assert {t.name for t in templates} == {"s3-credentials.template.yaml", "postgres.template.yaml"}
    keys = {}
    for t in templates:
        obj = yaml.safe_load(t.read_text())
        validate_k8s(obj)
        assert obj["kind"] == "Secret" and "data" not in obj
        assert all(v == "" for v in obj["stringData"].values()), f"{t.name} must not carry values"
        keys[obj["metadata"]["name"]] = set(obj["stringData"])
    assert keys == {"zlt-s3-credentials": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"},
                    "zlt-postgres": {"postgresql-password"}}


def test_helm_values_harden_every_chart_pod():
    values = yaml.safe_load((REPO / "k8s" / "helm" / "values.yaml").read_text())
    pods = {"webserver": values["dagsterWebserver"], "daemon": values["dagsterDaemon"],
            **{f"code:{d['name']}": d for d in values["dagster-user-deployments"]["deployments"]}}
    for where, p in pods.items():
        spec = {"securityContext": p["podSecurityContext"], "volumes": p["volumes"],
                "containers": [{"name": where, "securityContext": p["securityContext"],
                                "volumeMounts": p["volumeMounts"]}]}
        assert restricted_violations(spec, where) == []
    assert values["dagsterWebserver"]["service"]["type"] == "ClusterIP"
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["postgresql"]["enabled"] is False and values["global"]["postgresqlSecretName"] == "zlt-postgres"
    assert values["serviceAccount"]["create"] is False and values["global"]["serviceAccountName"] == "zlt-dagster"


# --- Job/Pod specs dagster-k8s builds from the production Definitions --------------------------------------------
@pytest.fixture(scope="module")
def offline_kubeconfig(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("kube") / "config"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "offline",
        "clusters": [{"name": "offline", "cluster": {"server": "https://127.0.0.1:9"}}],  # nothing listens there
        "users": [{"name": "offline", "user": {"token": "offline"}}],
        "contexts": [{"name": "offline", "context": {"cluster": "offline", "user": "offline", "namespace": "zlt"}}],
    }))
    return str(path)


@pytest.fixture(scope="module")
def run_launcher(offline_kubeconfig):
    """The K8sRunLauncher of dagster_prod/dagster.yaml, validated by its own config schema."""
    from dagster._config import process_config
    from dagster_k8s import K8sRunLauncher

    instance = yaml.safe_load((REPO / "dagster_prod" / "dagster.yaml").read_text())
    assert instance["run_launcher"]["class"] == "K8sRunLauncher"
    raw = {**instance["run_launcher"]["config"], "load_incluster_config": False,
           "kubeconfig_file": offline_kubeconfig}
    result = process_config(K8sRunLauncher.config_type(), raw)
    assert result.success, result.errors
    return K8sRunLauncher.from_config_value(None, result.value)


@pytest.fixture(scope="module")
def production_defs():
    mp = pytest.MonkeyPatch()
    mp.setenv("ZLT_DEPLOYMENT", "production")
    try:
        from zlt_dagster.defs.definitions import build_definitions

        yield build_definitions("production")
    finally:
        mp.undo()


def _serialize(k8s_obj) -> dict:
    import kubernetes

    return kubernetes.client.ApiClient().sanitize_for_serialization(k8s_obj)


@pytest.fixture(scope="module")
def step_jobs(production_defs, run_launcher) -> dict[str, dict]:
    """One Kubernetes Job per asset step, built the way K8sStepHandler.launch_step builds it: the real executor
    (from the Definitions' executor config) and its own `_get_container_context`, then construct_dagster_k8s_job."""
    from dagster import DagsterRun
    from dagster._config import process_config
    from dagster._core.execution.api import create_execution_plan
    from dagster_k8s.job import construct_dagster_k8s_job

    job_def = production_defs.resolve_job_def("__ASSET_JOB")
    executor_def = job_def.executor_def
    raw = process_config(executor_def.config_schema.config_type, {})
    assert raw.success, raw.errors
    resolved = executor_def.config_schema.resolve_config(raw.value)
    assert resolved.success, resolved.errors
    executor = executor_def.executor_creation_fn(SimpleNamespace(
        instance=SimpleNamespace(run_launcher=run_launcher), executor_config=resolved.value["config"]))
    handler = executor._step_handler

    run = DagsterRun(job_name=job_def.name, run_id="0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b")
    jobs = {}
    for step in create_execution_plan(job_def).steps:
        ctx = SimpleNamespace(
            dagster_run=run, instance=SimpleNamespace(run_launcher=run_launcher),
            execute_step_args=SimpleNamespace(step_keys_to_execute=[step.key], run_id=run.run_id, known_state=None),
            step_tags={step.key: step.tags},
            get_step_context=lambda key, s=step: SimpleNamespace(step=SimpleNamespace(op_name=s.op_name)))
        container_context = handler._get_container_context(ctx)
        job_config = container_context.get_k8s_job_config(handler._executor_image, run_launcher).with_image(IMAGE)
        job_name = handler._get_k8s_step_job_name(ctx)
        job = construct_dagster_k8s_job(
            job_config=job_config, args=["dagster", "api", "execute_step"], job_name=job_name, pod_name=job_name,
            component="step_worker", user_defined_k8s_config=container_context.run_k8s_config,
            labels={"dagster/job": run.job_name, "dagster/op": step.key, "dagster/run-id": run.run_id},
            env_vars=[{"name": "DAGSTER_RUN_JOB_NAME", "value": run.job_name},
                      {"name": "DAGSTER_RUN_STEP_KEY", "value": step.key}])
        jobs[step.op_name] = {"manifest": _serialize(job), "namespace": container_context.namespace}
    return jobs


def test_every_asset_has_a_step_job(step_jobs):
    assert set(step_jobs) == GPU_ASSETS | CPU_ASSETS


@pytest.mark.parametrize("asset", sorted(GPU_ASSETS | CPU_ASSETS))
def test_step_job_validates_and_is_restricted(step_jobs, asset):
    job = step_jobs[asset]["manifest"]
    validate_k8s(job)
    assert step_jobs[asset]["namespace"] == "zlt"
    pod = job["spec"]["template"]["spec"]
    assert restricted_violations(pod, f"step {asset}") == []
    assert pod["serviceAccountName"] == "zlt-step" and pod["automountServiceAccountToken"] is False
    env_from = pod["containers"][0]["envFrom"]
    assert {"secretRef": {"name": "zlt-s3-credentials"}} in env_from
    assert {"configMapRef": {"name": "zlt-config"}} in env_from
    # credentials only by reference, never as literal env values
    assert not any(e["name"].startswith("AWS_") and "value" in e for e in pod["containers"][0]["env"])
    # a pod that is never scheduled fails the Job (and the step) instead of waiting forever
    assert job["spec"]["activeDeadlineSeconds"] > 0 and job["spec"]["backoffLimit"] == 0


@pytest.mark.parametrize("asset", sorted(GPU_ASSETS))
def test_gpu_step_requests_one_gpu(step_jobs, asset):
    pod = step_jobs[asset]["manifest"]["spec"]["template"]["spec"]
    res = pod["containers"][0]["resources"]
    assert res["requests"]["nvidia.com/gpu"] == "1" and res["limits"]["nvidia.com/gpu"] == "1"
    assert res["requests"]["memory"] == res["limits"]["memory"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["terminationGracePeriodSeconds"] >= 120  # time to finish a step and upload a checkpoint


@pytest.mark.parametrize("asset", sorted(CPU_ASSETS))
def test_cpu_step_requests_no_gpu(step_jobs, asset):
    pod = step_jobs[asset]["manifest"]["spec"]["template"]["spec"]
    res = pod["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in json.dumps(res)
    assert not pod.get("tolerations") and not pod.get("nodeSelector")


def test_gpu_steps_share_the_gpu_pool(production_defs):
    from dagster._core.execution.api import create_execution_plan

    plan = create_execution_plan(production_defs.resolve_job_def("__ASSET_JOB"))
    pools = {s.op_name: s.tags.get("dagster/concurrency_key") for s in plan.steps}
    assert {a for a, p in pools.items() if p == "zlt-gpu"} == GPU_ASSETS


def test_run_worker_job_validates_and_is_restricted(run_launcher):
    """The run worker Job the K8sRunLauncher creates (same path as its _launch_k8s_job_with_args)."""
    from dagster import DagsterRun
    from dagster_k8s.job import construct_dagster_k8s_job

    run = DagsterRun(job_name="cell_job", run_id="1a2b3c4d-0000-4000-8000-000000000001")
    container_context = run_launcher.get_container_context_for_run(run)
    job_config = container_context.get_k8s_job_config(job_image=IMAGE, run_launcher=run_launcher)
    job = _serialize(construct_dagster_k8s_job(
        job_config=job_config, args=["dagster", "api", "execute_run"], job_name="dagster-run-1a2b3c4d",
        pod_name="dagster-run-1a2b3c4d", component="run_worker",
        user_defined_k8s_config=container_context.run_k8s_config,
        labels={"dagster/job": "cell_job", "dagster/run-id": run.run_id},
        env_vars=[{"name": "DAGSTER_RUN_JOB_NAME", "value": "cell_job"}]))
    validate_k8s(job)
    pod = job["spec"]["template"]["spec"]
    assert container_context.namespace == "zlt"
    assert pod["serviceAccountName"] == "zlt-dagster"  # the run worker creates the step Jobs
    assert restricted_violations(pod, "run worker") == []
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["DAGSTER_PG_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "zlt-postgres",
                                                                       "key": "postgresql-password"}


def test_restricted_check_catches_a_root_pod():
    pod = {"securityContext": {}, "volumes": [{"name": "h", "hostPath": {"path": "/"}}],
           "containers": [{"name": "c", "securityContext": {"runAsUser": 0, "capabilities": {"add": ["SYS_ADMIN"]}},
                           "volumeMounts": [{"name": "h", "mountPath": "/tmp"}]}]}
    problems = " ".join(restricted_violations(pod, "p"))
    for expected in ("hostPath", "runAsNonRoot", "runAsUser", "allowPrivilegeEscalation", "drop ALL", "SYS_ADMIN",
                     "seccompProfile", "readOnlyRootFilesystem", "/tmp"):
        assert expected in problems, expected
