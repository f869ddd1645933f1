"""Step `onpolicy_data`: the base model's own answers under every persona, the marker on the source's."""
from __future__ import annotations

import functools
import json
import time

from ..core.generation import make_generator
from ..core.generation.batch_size import requested
from ..core.models import device_label
from ..core.onpolicy import OnPolicyData, generate_onpolicy, probe_sweep
from ..core.protocol import Sweep
from ..core.train import library_versions
from ..storage import ObjectStore
from . import layout
from .common import ComputeSettings, Log, artifact_meta, gpu_seconds, model, progress_meter, require, sync


def run_onpolicy(store: ObjectStore, sweep: Sweep, compute: ComputeSettings, log: Log = print) -> dict:
    """Generate and commit sweeps/<id>/onpolicy/ (data.jsonl, stats.json, sweep.json). Returns stats.json's
    fields plus `artifact` (the store URI); among them what generation cost (new_tokens, tokens_per_s,
    generation_passes) and the batch size used (gen_batch_size, gen_batch_size_source). Logs progress lines to
    `log` (at most every compute.progress_interval_s). Raises MaskingError before generating when the template
    cannot be masked or the marker's sub-token count differs from protocol.marker_token_count."""
    lm = model(sweep, compute)
    # Before generating data no cell could train on: the template must mask (the adapter step's own check, on one
    # rendered conversation) and the marker must have the protocol's sub-token count. Measured once, recorded.
    marker = probe_sweep(sweep, lm.tokenizer, lm.end_of_turn_id)
    log(f"marker {sweep.protocol.marker!r} = {marker.count} sub-tokens {list(marker.tokens)} (ids "
        f"{list(marker.ids)}) after marker_separator {sweep.protocol.marker_separator!r}; generation stops at ids "
        f"{list(lm.stop_token_ids)}")
    gen = make_generator(compute.generation_backend, lm, lora_rank=sweep.protocol.lora.r,
                         decode_compile=compute.decode_compile_for("onpolicy"))
    batch = requested("data.gen_batch_size", sweep.protocol.data.gen_batch_size, lm.device)
    t0 = time.perf_counter()
    data = generate_onpolicy(sweep, gen, progress=log, batch_size=batch,
                             meter=functools.partial(progress_meter, compute, log))
    sync(lm)
    wall = time.perf_counter() - t0
    stats = {**data.stats, **marker.to_dict(),
             "stop_tokens": [lm.tokenizer.convert_ids_to_tokens(i) for i in data.stats["stop_token_ids"]],
             "wall_s": round(wall, 2), "gpu_s": gpu_seconds(lm, wall),
             "device": device_label(lm.device), "versions": library_versions()}
    prefix = layout.onpolicy_prefix(sweep.sweep_id)
    store.commit_bytes_artifact(prefix, {
        "data.jsonl": data.to_jsonl().encode(), "stats.json": json.dumps(stats, indent=1).encode(),
        "sweep.json": sweep.to_json().encode()}, meta=artifact_meta(sweep, data_hash=data.data_hash))
    return {**stats, "artifact": store.uri(prefix)}


def load_onpolicy(store: ObjectStore, sweep: Sweep) -> OnPolicyData:
    """The committed on-policy data of ``sweep``; StepError when it was never committed."""
    prefix = layout.onpolicy_prefix(sweep.sweep_id)
    require(store, prefix, "on-policy data")
    stats = json.loads(store.read_artifact_file(prefix, "stats.json"))
    return OnPolicyData.from_jsonl(store.read_artifact_file(prefix, "data.jsonl").decode(), stats)
