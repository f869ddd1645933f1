"""Loopback stand-ins for what the production step path needs from its surroundings, for
tests/defs/test_production_step.py: a real PostgreSQL server, and the two Kubernetes pieces that cannot run on a
machine without a cluster.

`postgres_server`: PostgreSQL 15 (initdb/pg_ctl from /usr/lib/postgresql/15/bin) run as `nobody`, on 127.0.0.1,
password (scram-sha-256) auth for TCP, one fresh database.

`LocalKubernetes`: an HTTPS API server that implements the batch/v1 Job calls dagster-k8s makes (create, read
status, delete), reached by the unmodified `kubernetes` client (in-cluster config inside pods: token + CA mounted at
/var/run/secrets/kubernetes.io/serviceaccount; a kubeconfig on the test side), plus a kubelet that runs each
created Job's one container as a local process, the way a node would:
- the container's command/args exactly as in the Job manifest that dagster-k8s built;
- the environment Kubernetes composes: the image's ENV (parsed from docker/Dockerfile's final stage, /opt/venv/bin
  mapped to this machine's venv), KUBERNETES_SERVICE_HOST/PORT and HOSTNAME, then `envFrom` ConfigMaps and
  Secrets, then `env` (literals, secretKeyRef, configMapKeyRef, fieldRef);
- its own mount namespace (`unshare -m`): each emptyDir a fresh directory (so /tmp starts empty, as in a new pod),
  ConfigMap/Secret volumes as files, the service-account token only where automountServiceAccountToken is not
  false, the root filesystem read-only where the container asks for readOnlyRootFilesystem, the image's WORKDIR.
NOT reproduced: the uid (pods run as root here: the image's uid 10001 cannot read this machine's Python), resource
requests and limits (no GPU, no cgroups), seccomp/capabilities, network policy, image pulls, scheduling.
"""
from __future__ import annotations

import contextlib
import datetime
import http.server
import ipaddress
import json
import os
import sys
import re
import secrets
import shlex
import shutil
import signal
import ssl
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from loopback import free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
REPO_ROOT = Path(__file__).resolve().parents[2]  # this checkout
STAGING = "/mnt"  # an existing directory, briefly covered inside the pod only (see LocalKubernetes._container)


# --- PostgreSQL --------------------------------------------------------------------------------------------------
@dataclass
class Postgres:
    host: str
    port: int
    user: str
    password: str
    db: str
    root: Path

    def log(self) -> str:
        p = self.root / "postgres.log"
        return p.read_text(errors="replace") if p.exists() else ""


@contextlib.contextmanager
def postgres_server(db: str = "zlt_dagster", user: str = "dagster", password: str | None = None):
    """PostgreSQL 15 as `nobody` (initdb refuses root) on 127.0.0.1:<free port>; yields a Postgres."""
    password = password or "zlt-pg-" + secrets.token_hex(12)
    root = Path(tempfile.mkdtemp(prefix="zlt-pg-"))
    os.chmod(root, 0o755)
    data, sock, pwfile = root / "data", root / "sock", root / "pw"
    for d in (data, sock):
        d.mkdir()
        shutil.chown(d, "nobody")
    os.chmod(data, 0o700)
    pwfile.write_text(password)
    shutil.chown(pwfile, "nobody")
    os.chmod(pwfile, 0o600)
    log = root / "postgres.log"
    log.touch()
    shutil.chown(log, "nobody")

    def as_nobody(*cmd, **kw):
        return subprocess.run(["runuser", "-u", "nobody", "--", *map(str, cmd)], cwd=root, capture_output=True,
                              text=True, timeout=120, **kw)

    out = as_nobody(PG_BIN / "initdb", "-D", data, "-U", user, f"--pwfile={pwfile}", "--auth-local=trust",
                    "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync")
    pwfile.unlink()
    if out.returncode:
        raise RuntimeError(f"initdb failed: {out.stdout}\n{out.stderr}")
    started = False
    try:
        for _ in range(3):  # a free port can be taken between the probe and the bind: try another
            port = free_port()
            opts = (f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={sock} -c fsync=off "
                    f"-c synchronous_commit=off -c full_page_writes=off")
            out = as_nobody(PG_BIN / "pg_ctl", "-D", data, "-l", log, "-w", "-t", "60", "-o", opts, "start")
            if out.returncode == 0:
                started = True
                break
        if not started:
            raise RuntimeError(f"pg_ctl start failed: {out.stdout}\n{out.stderr}\n{log.read_text()}")
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=port, user=user, password=password, dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{db}"')
        conn.close()
        yield Postgres("127.0.0.1", port, user, password, db, root)
    finally:
        if started:
            as_nobody(PG_BIN / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


# --- the image's environment ------------------------------------------------------------------------------------
def image_env(dockerfile: Path, venv_bin: str) -> tuple[dict[str, str], str]:
    """(ENV, WORKDIR) of the Dockerfile's final stage; /opt/venv/bin (the image's venv) -> venv_bin."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    last_from = max(i for i, ln in enumerate(lines) if ln.upper().startswith("FROM "))
    env: dict[str, str] = {}
    workdir = "/"
    for ln in lines[last_from + 1:]:
        word, _, rest = ln.partition(" ")
        if word.upper() == "ENV":
            for tok in shlex.split(rest):
                key, eq, value = tok.partition("=")
                if not eq:
                    raise ValueError(f"{dockerfile}: only ENV key=value is understood, got {ln!r}")
                value = value.replace("$PATH", BASE_PATH).replace("${PATH}", BASE_PATH)
                env[key] = value.replace("/opt/venv/bin", venv_bin)
        elif word.upper() == "WORKDIR":
            workdir = rest.strip()
    env.setdefault("PATH", BASE_PATH)
    return env, workdir


# --- TLS for the API server ------------------------------------------------------------------------------------
def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes")])
    now = datetime.datetime.now(datetime.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "ca.crt", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


# --- API server + kubelet ---------------------------------------------------------------------------------------
@dataclass
class Pod:
    job_name: str
    name: str
    namespace: str
    manifest: dict
    dir: Path
    proc: subprocess.Popen | None = None
    error: str = ""  # set when the kubelet could not start the container (missing ConfigMap/Secret, ...)
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None

    @property
    def component(self) -> str:
        return self.manifest["metadata"].get("labels", {}).get("app.kubernetes.io/component", "")

    @property
    def log_path(self) -> Path:
        return self.dir / "container.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else self.error

    def returncode(self) -> int | None:
        if self.error:
            return 1
        return self.proc.poll() if self.proc else None

    def status(self) -> dict:
        rc = self.returncode()
        if rc is None:
            return {"active": 1}
        if rc == 0:
            return {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
        return {"failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                             "message": self.error or f"container exited with {rc}"}]}


class LocalKubernetes:
    """See the module docstring. `config_maps` / `secrets`: {name: {key: value}} (the cluster's objects)."""

    def __init__(self, root: Path, *, config_maps: dict, secrets_: dict, image_env: dict, workdir: str):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_maps, self.secrets, self.image_env, self.workdir = config_maps, secrets_, image_env, workdir
        self.sa_token = "sa-" + secrets.token_hex(16)        # the run worker's service-account token
        self.client_token = "client-" + secrets.token_hex(16)  # the test's kubeconfig (the daemon's role)
        self.cert, self.key = self_signed_cert(self.root)
        self.pods: dict[tuple[str, str], Pod] = {}
        self.requests: list[tuple[str, str, str]] = []  # (method, path, which token)
        self.unhandled: list[str] = []
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert, self.key)
        self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # -- lifecycle --
    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()
        for pod in self.pods.values():
            if pod.proc and pod.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pod.proc.pid, signal.SIGKILL)
                pod.proc.wait(timeout=10)

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "local",
            "clusters": [{"name": "local", "cluster": {"server": f"https://127.0.0.1:{self.port}",
                                                       "certificate-authority": str(self.cert)}}],
            "users": [{"name": "local", "user": {"token": self.client_token}}],
            "contexts": [{"name": "local", "context": {"cluster": "local", "user": "local", "namespace": "zlt"}}]}))
        return path

    def jobs(self, component: str | None = None) -> list[Pod]:
        with self._lock:
            return [p for p in self.pods.values() if component is None or p.component == component]

    # -- HTTP --
    def _handler(self):
        kube = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _send(self, code: int, obj: dict):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _route(self, method: str):
                scheme, _, token = self.headers.get("Authorization", "").partition(" ")
                who = {kube.sa_token: "service-account", kube.client_token: "client"}.get(
                    token.strip(), "") if scheme.lower() == "bearer" else ""
                path = self.path.split("?")[0]
                kube.requests.append((method, path, who))
                if not who:
                    return self._send(401, _status(401, "Unauthorized", "no or unknown bearer token"))
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                m = re.fullmatch(r"/apis/batch/v1/namespaces/([^/]+)/jobs(?:/([^/]+)(/status)?)?", path)
                if m and method == "POST" and not m.group(2):
                    return self._send(*kube._create_job(m.group(1), body))
                if m and method == "GET" and m.group(2):
                    return self._send(*kube._read_job(m.group(1), m.group(2)))
                if m and method == "DELETE" and m.group(2) and not m.group(3):
                    return self._send(*kube._delete_job(m.group(1), m.group(2)))
                kube.unhandled.append(f"{method} {self.path}")
                return self._send(404, _status(404, "NotFound", f"{method} {path} is not served here"))

            def do_GET(self):
                self._route("GET")

            def do_POST(self):
                self._route("POST")

            def do_DELETE(self):
                self._route("DELETE")

        return Handler

    def _create_job(self, namespace: str, job: dict):
        name = job["metadata"]["name"]
        with self._lock:
            if (namespace, name) in self.pods:
                return 409, _status(409, "AlreadyExists", f'jobs.batch "{name}" already exists')
            pod_name = f"{name}-{secrets.token_hex(3)}"[:63]
            pod = Pod(name, pod_name, namespace, job, self.root / "pods" / pod_name)
            self.pods[(namespace, name)] = pod
        self._start(pod)
        return 201, self._job_view(pod)

    def _read_job(self, namespace: str, name: str):
        pod = self.pods.get((namespace, name))
        if pod is None:
            return 404, _status(404, "NotFound", f'jobs.batch "{name}" not found')
        return 200, self._job_view(pod)

    def _delete_job(self, namespace: str, name: str):
        pod = self.pods.get((namespace, name))
        if pod is None:
            return 404, _status(404, "NotFound", f'jobs.batch "{name}" not found')
        if pod.proc and pod.proc.poll() is None:
            os.killpg(pod.proc.pid, signal.SIGTERM)
        return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success"}

    def _job_view(self, pod: Pod) -> dict:
        return {**pod.manifest, "apiVersion": "batch/v1", "kind": "Job",
                "metadata": {**pod.manifest["metadata"], "namespace": pod.namespace, "uid": pod.name},
                "status": pod.status()}

    # -- kubelet --
    def _start(self, pod: Pod) -> None:
        try:
            argv, env, cwd_script = self._container(pod)
        except KubeletError as e:
            pod.error = f"CreateContainerConfigError: {e}"
            pod.ended = time.monotonic()
            return
        pod.dir.mkdir(parents=True, exist_ok=True)
        with open(pod.log_path, "wb") as log:
            pod.proc = subprocess.Popen(
                ["/usr/bin/unshare", "-m", "--propagation", "private", "/bin/sh", "-c", cwd_script, "pod", *argv],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd="/",
                start_new_session=True)
        threading.Thread(target=self._reap, args=(pod,), daemon=True).start()

    @staticmethod
    def _reap(pod: Pod) -> None:
        pod.proc.wait()
        pod.ended = time.monotonic()

    def _container(self, pod: Pod) -> tuple[list[str], dict[str, str], str]:
        spec = pod.manifest["spec"]["template"]["spec"]
        if spec.get("initContainers") or len(spec["containers"]) != 1:
            raise KubeletError("this kubelet runs exactly one container and no init containers")
        c = spec["containers"][0]
        argv = [*(c.get("command") or []), *(c.get("args") or [])]
        if not argv:
            raise KubeletError("no command/args (the image's CMD is not used by dagster-k8s Jobs)")

        env = dict(self.image_env)
        env.update(KUBERNETES_SERVICE_HOST="127.0.0.1", KUBERNETES_SERVICE_PORT=str(self.port), HOSTNAME=pod.name)
        for src in c.get("envFrom") or []:
            if "configMapRef" in src:
                env.update(self._object(self.config_maps, "ConfigMap", src["configMapRef"]))
            elif "secretRef" in src:
                env.update(self._object(self.secrets, "Secret", src["secretRef"]))
            else:
                raise KubeletError(f"envFrom {src} not understood")
        for e in c.get("env") or []:
            if "value" in e or "valueFrom" not in e:
                env[e["name"]] = e.get("value") or ""
                continue
            vf = e["valueFrom"]
            if "secretKeyRef" in vf:
                env[e["name"]] = self._key(self.secrets, "Secret", vf["secretKeyRef"])
            elif "configMapKeyRef" in vf:
                env[e["name"]] = self._key(self.config_maps, "ConfigMap", vf["configMapKeyRef"])
            elif "fieldRef" in vf:
                env[e["name"]] = {"metadata.name": pod.name, "metadata.namespace": pod.namespace}[
                    vf["fieldRef"]["fieldPath"]]
            else:
                raise KubeletError(f"env {e['name']}: valueFrom {vf} not understood")

        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        mounts: list[tuple[str, Path, bool]] = []  # (mount path, host dir, read-only)
        for vm in c.get("volumeMounts") or []:
            vol = volumes.get(vm["name"])
            if vol is None:
                raise KubeletError(f"volumeMount {vm['name']} has no volume")
            host = pod.dir / "volumes" / vm["name"]
            host.mkdir(parents=True, exist_ok=True)
            if "emptyDir" in vol:
                ro = False
            elif "configMap" in vol or "secret" in vol:
                if "configMap" in vol:
                    kind, store, ref = "ConfigMap", self.config_maps, vol["configMap"]
                else:
                    kind, store, ref = "Secret", self.secrets, {**vol["secret"], "name": vol["secret"]["secretName"]}
                data = self._object(store, kind, ref)
                items = ref.get("items") or [{"key": k, "path": k} for k in data]
                for it in items:
                    (host / it["path"]).write_text(data[it["key"]])
                ro = True
            else:
                raise KubeletError(f"volume {vm['name']}: only emptyDir, configMap and secret are understood")
            target = vm["mountPath"]
            if vm.get("subPath"):
                raise KubeletError("subPath mounts are not understood")
            mounts.append((target, host, ro or bool(vm.get("readOnly"))))
        if spec.get("automountServiceAccountToken") is not False:
            sa = pod.dir / "serviceaccount"
            sa.mkdir(parents=True, exist_ok=True)
            (sa / "token").write_text(self.sa_token)
            (sa / "ca.crt").write_bytes(self.cert.read_bytes())
            (sa / "namespace").write_text(pod.namespace)
            mounts.append((SA_DIR, sa, True))

        # the pod's host directory lives under the host's /tmp, which the pod's own /tmp hides: reach it through
        # /mnt while mounting (covered only inside this mount namespace), then unmount it so the pod sees /mnt again
        lines = ["set -eu", f"mount --bind {shlex.quote(str(pod.dir))} {STAGING}"]
        # The image's files (this checkout and its venv stand in for /opt/venv and the installed package) must stay
        # visible even when a pod mount covers them, e.g. a checkout under /tmp with the pod's /tmp emptyDir on
        # top: reach them through the staging mount first, bind them back after the pod's mounts.
        reals = [os.path.realpath(m[0]) for m in mounts]
        keep = [k for k in dict.fromkeys(os.path.realpath(p) for p in (REPO_ROOT, sys.prefix))
                if any(k == r or k.startswith(r + "/") for r in reals)]
        for i, k in enumerate(keep):
            (pod.dir / "keep" / str(i)).mkdir(parents=True, exist_ok=True)
            lines.append(f"mount --bind {shlex.quote(k)} {STAGING}/keep/{i}")
        fresh: list[str] = []  # paths that are fresh mounts inside the pod (mkdir there touches no host state)
        for target, host, ro in sorted(mounts, key=lambda m: os.path.realpath(m[0]).count("/")):
            real = os.path.realpath(target)
            if not any(real == f or real.startswith(f + "/") for f in fresh) and not os.path.isdir(real):
                anc = real
                while not os.path.isdir(anc):
                    anc = os.path.dirname(anc)
                if anc == "/":
                    raise KubeletError(f"cannot create mount point {target}")
                # an image would have this directory; here an empty tmpfs stands in for the ancestor
                lines.append(f"mount -t tmpfs -o size=16m tmpfs {shlex.quote(anc)}")
                fresh.append(anc)
            lines.append(f"mkdir -p {shlex.quote(real)}")
            src = f"{STAGING}/{host.relative_to(pod.dir)}"
            lines.append(f"mount --bind {shlex.quote(src)} {shlex.quote(real)}")
            if ro:
                lines.append(f"mount -o remount,bind,ro {shlex.quote(real)}")
            fresh.append(real)
        for i, k in enumerate(keep):
            lines += [f"mkdir -p {shlex.quote(k)}", f"mount --bind {STAGING}/keep/{i} {shlex.quote(k)}",
                      f"mount -o remount,bind,ro {shlex.quote(k)}"]
        lines.append(f"umount -l {STAGING}")  # lazily: the kept binds above were made through it
        if (c.get("securityContext") or {}).get("readOnlyRootFilesystem"):
            lines.append("mount -o remount,bind,ro /")
        lines.append(f"cd {shlex.quote(c.get('workingDir') or self.workdir)}")
        lines.append('exec "$@"')
        return argv, env, "\n".join(lines)

    @staticmethod
    def _object(store: dict, kind: str, ref: dict) -> dict:
        if ref["name"] not in store:
            if ref.get("optional"):
                return {}
            raise KubeletError(f'{kind} "{ref["name"]}" not found')
        return store[ref["name"]]

    def _key(self, store: dict, kind: str, ref: dict) -> str:
        data = self._object(store, kind, ref)
        if ref["key"] not in data:
            raise KubeletError(f'{kind} "{ref["name"]}" has no key {ref["key"]!r}')
        return data[ref["key"]]


class KubeletError(RuntimeError):
    pass


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason,
            "message": message}
