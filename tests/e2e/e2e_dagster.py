"""`dagster dev` on loopback for the end-to-end tests: its environment (a temporary instance with the project's
instance settings, artifact root and sweep registry; the tiny protocol) and a small GraphQL client."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from loopback import free_port

REPO = Path(__file__).resolve().parents[2]
TERMINAL = {"SUCCESS", "FAILURE", "CANCELED"}


def dagster_env(tmp: Path, registry_entries: list[dict]) -> dict:
    """Environment for `dagster dev`: instance at tmp/home (zlt_dagster.defs.instance settings: one run at a time; the
    queue checked every second), artifacts at tmp/artifacts, registry tmp/sweeps.yaml, sensor every 5 s, CPU."""
    from zlt_dagster.defs.instance import instance_config

    home = tmp / "home"
    home.mkdir()
    cfg = instance_config(home)
    cfg["run_coordinator"]["config"]["dequeue_interval_seconds"] = 1
    cfg["code_servers"] = {"local_startup_timeout": 300}
    (home / "dagster.yaml").write_text(yaml.safe_dump(cfg))
    (tmp / "sweeps.yaml").write_text(yaml.safe_dump(registry_entries))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "ZLT_"))}
    env.update(DAGSTER_HOME=str(home), ZLT_ARTIFACT_ROOT=str(tmp / "artifacts"), ZLT_ARC_SOURCE="sample",
               ZLT_SWEEP_REGISTRY=str(tmp / "sweeps.yaml"), ZLT_REGISTRY_SENSOR_INTERVAL_S="5", ZLT_DEVICE="cpu",
               ZLT_TORCH_THREADS="1", PYTHONUNBUFFERED="1")
    return env


class Dagster:
    """`dagster dev` on loopback in its own process group, with a tiny GraphQL client."""

    def __init__(self, tmp: Path, env: dict):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.base}/graphql"
        self.tmp, self.artifacts, self.registry = tmp, tmp / "artifacts", tmp / "sweeps.yaml"
        self.log = open(tmp / "dagster_dev.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dagster", "dev", "-h", "127.0.0.1", "-p", str(self.port),
             "-m", "zlt_dagster.defs.definitions"],
            cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        """Ctrl+C for the whole process group (what `dagster dev` expects), then SIGKILL for what is left: the
        group is this test's own session (webserver, daemon, code servers, run workers)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        self.log.close()

    def gql(self, query: str, variables: dict | None = None) -> dict:
        req = urllib.request.Request(self.url, data=json.dumps({"query": query, "variables": variables or {}})
                                     .encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            body = json.loads(resp.read())
        assert not body.get("errors"), body["errors"]
        return body["data"]

    def wait(self, what: str, fn, timeout: float, every: float = 2.0):
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"dagster dev exited while waiting for {what}; see its log"
            try:
                value = fn()
            except (OSError, urllib.error.URLError):  # webserver not up yet
                value = None
            if value:
                return value
            assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
            time.sleep(every)

    def location(self):
        data = self.gql("""{ workspaceOrError { __typename ... on Workspace { locationEntries { name
            locationOrLoadError { __typename ... on RepositoryLocation { repositories { name } }
            ... on PythonError { message } } } } } }""")
        for entry in data["workspaceOrError"].get("locationEntries", []):
            loc = entry["locationOrLoadError"] or {}
            assert loc.get("__typename") != "PythonError", loc.get("message")
            if loc.get("__typename") == "RepositoryLocation":
                return entry["name"], loc["repositories"][0]["name"]
        return None

    def runs(self) -> list[dict]:
        data = self.gql("""{ runsOrError { ... on Runs { results { runId status jobName
            tags { key value } } } } }""")
        out = []
        for r in data["runsOrError"]["results"]:
            tags = {t["key"]: t["value"] for t in r["tags"]}
            sweep = tags.get("dagster/partition/sweep") or tags.get("dagster/partition")
            if sweep is None and "dagster/asset_partition_range_start" in tags:  # a grouped adapter run
                from zlt_dagster.defs.partitions import split_partition_key

                sweep = split_partition_key(tags["dagster/asset_partition_range_start"])[0]
            out.append({**r, "tags": tags, "sweep": sweep})
        return out
