"""vLLM backend (the GPU path): one engine per base model and process, LoRA adapters per request via LoRARequest.

Why vLLM: the seed generated with it, and on a GPU its scheduler keeps every sequence of a step in flight (continuous
batching, paged KV cache, prefix caching shares a prompt's prefill among its samples, CUDA graphs for the decode
step): the transformers loops are host-bound on a small model (BENCHMARKS.md, generation section).

Things that matter when several steps share a process (the in-process executor of `zlt demo` / `zlt run` on a GPU
machine; on Kubernetes every step is its own pod, so one engine per pod anyway):
- the engine is built once per (model, LoRA rank, dtype) and reused: a second `LLM(...)` would wait ~1 min to start
  and reserve its own share of GPU memory on top of the first;
- vLLM reserves `gpu_memory_utilization` x total memory at start-up and refuses to start if that is not free. The
  pipeline's transformers copy of the base model (tokenizer, chat template, ARC) is already on the GPU: 15 GB for
  a 7B model in bf16, so a fixed 0.85 of an 80 GB card does not fit. The default is therefore what is free now,
  less a margin, capped at 0.85.
- the engine runs in the model's dtype (bf16 on a GPU): the source directory of a de-quantised GGUF holds fp32
  weights, and vLLM's "auto" would take the config's fp32.
vLLM caches adapters by `lora_int_id`: an id names one adapter's CONTENT, so it is keyed by path and the weights
file's size and mtime (a reused temporary path with a new adapter gets a new id).

Seeds: every prompt gets its own seed (sweep seed and prompt index through `prompt_seed`), and vLLM gives a
prompt's k-th sample seed + k (v1/engine/parallel_sampling.py). A completion therefore depends on its prompt, its
index and the seed only: not on the batch it ran in, on the other requests in flight or on what the engine ran
before. The price is vLLM's per-request generator loop in the sampler (one small kernel per seeded row and step);
benchmarks/gen_bench.py measures seeded against unseeded (ZLT_VLLM_SEEDED=0 turns it off: then one engine-wide
stream, reproducible only for the same requests in the same order on a fresh engine).
"""
from __future__ import annotations

import os
from typing import Sequence

from ... import settings
from .base import Completion, Generator, PromptSpec

MAX_MEMORY_FRACTION = 0.85
MEMORY_MARGIN = 0.05  # of total memory, left for CUDA graphs, the sampler and fragmentation
# vLLM accepts only these LoRA ranks (vllm/config/lora.py MaxLoRARanks); the engine takes the smallest >= the adapter's
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
# sequences in flight (vLLM's own default on an 80+ GB card) and CUDA graphs captured up to as many rows: vLLM's
# default captures only up to 512, so full batches decode without graphs. Measured on the H200, SmolLM2-135M, the
# paper's completions workload (benchmarks/gen_h200/run3_a78767e_135m.json vs run4_a4ffd9b_135m_cudagraph1024.json):
# 14.2k -> 25.8k tok/s, engine start 85 -> 128 s (more graphs to capture). Not measured on 7B shapes.
MAX_NUM_SEQS = 1024
# longest prompt + completion the engine accepts; the protocol's longest is a ~150-token prompt + 1,024 regenerated
# tokens. Capped by the model's own max_position_embeddings.
MAX_MODEL_LEN = 4096
_ENGINES: dict[tuple, object] = {}
_LORA_IDS: dict[tuple[str, int, int], int] = {}


def memory_fraction(requested: float | None = None) -> float:
    """The share of GPU memory the engine may take: `requested`, or (free now - margin), at most 0.85.
    Raises ValueError for a requested share outside (0, 1], RuntimeError when less than 20% is free."""
    if requested is not None:
        if not 0 < requested <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {requested}")
        return requested
    import torch

    if not torch.cuda.is_available():
        return MAX_MEMORY_FRACTION
    # what torch's caching allocator holds unused goes back to the driver first: vLLM sizes itself from the driver's
    # free figure, and a decode loop that ran before can leave most of the card cached (H200: 132 of 139 GiB)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    fraction = min(MAX_MEMORY_FRACTION, free / total - MEMORY_MARGIN)
    if fraction < 0.2:
        raise RuntimeError(f"only {free / 2**30:.1f} of {total / 2**30:.1f} GiB GPU memory is free: too little for "
                           "a vLLM engine (another process, or a model left on the GPU)")
    return fraction


def engine_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts that holds a LoRA of rank `rank`; ValueError above vLLM's largest (512)."""
    for r in VLLM_LORA_RANKS:
        if r >= rank:
            return r
    raise ValueError(f"LoRA rank {rank} is above vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}")


def prompt_seed(seed: int, prompt_index: int) -> int:
    """The seed of one prompt's requests: distinct per (seed, prompt), < 2**31 (vLLM seeds torch generators).
    Its samples get prompt_seed + sample index (vLLM's parallel sampling), so prompts are spaced 2**16 apart."""
    return (seed * 1_000_003 + prompt_index * 65_536) % (2**31 - 1)


def _adapter_key(adapter_dir: str) -> tuple[str, int, int]:
    weights = os.path.join(adapter_dir, "adapter_model.safetensors")
    st = os.stat(weights)  # a missing adapter is an error here, not inside the engine
    return os.path.realpath(adapter_dir), st.st_size, st.st_mtime_ns


def engine_kwargs(loaded, lora_rank: int) -> dict:
    """The LLM(...) arguments for `loaded` (a core.models.LoadedModel whose `source` is a transformers directory or a
    hub id) but its memory share: its weights and tokenizer, its dtype, LoRA of `lora_rank` (rounded up to a rank
    vLLM accepts). One adapter at a time: every request of a call uses the same one. They name the engine: the same
    arguments reuse the process's engine."""
    import torch

    dtype = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[loaded.dtype]
    max_pos = getattr(loaded.model.config, "max_position_embeddings", MAX_MODEL_LEN) or MAX_MODEL_LEN
    return dict(model=loaded.source, tokenizer=loaded.source, dtype=dtype, enable_lora=True,
                max_lora_rank=engine_lora_rank(lora_rank), max_loras=1, max_model_len=min(MAX_MODEL_LEN, max_pos),
                max_num_seqs=MAX_NUM_SEQS, compilation_config={"max_cudagraph_capture_size": MAX_NUM_SEQS}, seed=0)


class VllmGenerator(Generator):
    name = "vllm"

    def __init__(self, loaded, lora_rank: int = 32, gpu_memory_utilization: float | None = None,
                 seeded: bool | None = None, **engine_overrides):
        """engine_overrides: extra LLM(...) arguments (benchmarks: max_num_seqs, load_format="dummy", ...).
        seeded: per-prompt seeds (module docstring); None = ZLT_VLLM_SEEDED (default on)."""
        import importlib.util

        if importlib.util.find_spec("flashinfer") is None:
            # vLLM 0.24's sampler probes FlashInfer by importing it unguarded (v1/sample/ops/topk_topp_sampler.py
            # flashinfer_sampler_supported) and the engine dies where it is not installed (it is optional: the GPU
            # kit does not carry it); =0 makes vLLM use its PyTorch sampler without the probe
            os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
        from vllm import LLM  # imported here: vllm is only in the GPU image

        self.loaded = loaded
        kwargs = {**engine_kwargs(loaded, lora_rank), **engine_overrides}
        key = tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
        if key not in _ENGINES:
            # the memory share only for a NEW engine: with one already running, "what is free now" is what that
            # engine left (measured on the H200: 18 of 139 GiB), and the step that wanted to reuse it failed
            _ENGINES[key] = LLM(**kwargs, gpu_memory_utilization=memory_fraction(gpu_memory_utilization))
        self.llm = _ENGINES[key]
        self.engine_args = {k: v for k, v in kwargs.items() if k not in ("model", "tokenizer")}
        self.seeded = settings.vllm_seeded() if seeded is None else seeded

    def _lora_request(self, adapter_dir: str | None):
        if adapter_dir is None:
            return None
        from vllm.lora.request import LoRARequest

        lora_id = _LORA_IDS.setdefault(_adapter_key(adapter_dir), len(_LORA_IDS) + 1)
        return LoRARequest(f"adapter-{lora_id}", lora_id, adapter_dir)

    def generate(self, prompts: Sequence[PromptSpec], n_samples: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int, adapter_dir: str | None = None,
                 batch_size: int = 32, progress=None) -> list[Completion]:
        """batch_size is ignored: vLLM's scheduler keeps as many sequences in flight as its KV cache holds, at most
        MAX_NUM_SEQS. progress: a GenerationProgress fed with every finished
        prompt's samples."""
        from vllm import SamplingParams

        lm = self.loaded
        # the same stop ids as the transformers backends (vLLM adds the generation config's eos ids by itself; listing
        # them keeps the two equal whatever the vLLM version does)
        def params(i: int) -> SamplingParams:
            return SamplingParams(n=n_samples, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                  seed=prompt_seed(seed, i) if self.seeded else None,
                                  stop_token_ids=list(self.stop_token_ids), skip_special_tokens=True)

        token_prompts = [{"prompt_token_ids": lm.prompt_ids(p.system, p.user)} for p in prompts]
        # enqueue + step instead of LLM.generate: the same engine loop (vllm/entrypoints/offline_utils._run_engine),
        # with our progress report instead of a tqdm bar
        ids = self.llm.enqueue(token_prompts, [params(i) for i in range(len(prompts))],
                               lora_request=self._lora_request(adapter_dir), use_tqdm=False)
        engine = self.llm.llm_engine
        if progress is not None:
            progress.set_batch(engine.vllm_config.scheduler_config.max_num_seqs,
                               "vLLM scheduler (max_num_seqs)")
        finished: dict[str, object] = {}
        while engine.has_unfinished_requests():
            for res in engine.step():
                if res.finished:
                    finished[res.request_id] = res
                    if progress is not None:
                        progress.advance(tokens=sum(len(o.token_ids) for o in res.outputs),
                                        sequences=len(res.outputs))
        if set(ids) != set(finished):  # not the ids it handed out: vLLM's own order (request ids count up)
            ids = sorted(finished, key=int)
        out = []
        for i, rid in enumerate(ids):
            for s, o in enumerate(finished[rid].outputs):
                # vLLM reports "stop" for a stop token and "length" for max_tokens, like the transformers backend;
                # its token_ids already hold the stop token when it stopped on one.
                out.append(Completion(prompt_index=i, sample_index=s, text=o.text, n_new_tokens=len(o.token_ids),
                                      finish_reason=o.finish_reason))
        return out
