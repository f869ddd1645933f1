"""Train 1..N (LR, epochs) cells in one pass: LoRA on every linear module, marker-only loss, AdamW + cosine.

Arithmetic of a paper cell: 2,200 examples / effective batch 16 = 138 optimizer steps per epoch (the last step of
an epoch takes the 8 left over), so lr=5e-6 x 20 epochs = 2,760 steps.
The loss is the mean cross-entropy over the supervised tokens of an effective batch (sum over its micro-batches
/ their supervised-token count), so the result does not depend on how the batch is split into micro-batches.

Why N cells can share one pass: the batches of a step, their order (`epoch_order(seed, epoch)`), the LoRA
initialisation and the dropout masks (per example, core/lora_bank.py) depend on the seed, the epoch and the
step only, never on the LR or on how many epochs a cell has. So at global step g every cell that is still
training sees the same examples; each has its own adapter (a block of rows in the forward pass), AdamW state,
LR schedule (its own length) and grad-norm clip, and a cell with fewer epochs simply stops earlier. One cell
is the N = 1 case; results per cell equal N separate runs (tests/core/test_train_group.py, float64).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import platform
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from . import batch_plan, packing, train_graphs
from .. import settings
from .bank_adamw import BankAdamW
from .checkpoint import Checkpointer, TrainState, stop_signal_flags
from .compiled_layers import compiled_decoder_layers
from .lora_bank import LoraBank, example_key
from .masking import IGNORE, TokenizedExample, build_example, check_marker_round_trip
from .models import LoadedModel, device_label, unwrap_peft
from .onpolicy import OnPolicyData
from .packing import PackedBatch, is_packed, packed_attention
from .protocol import Cell, Protocol, is_finite_number

# Compiled layers see widths padded to a multiple of 8: the graph inductor builds for SDPA guards on
# width % 8 (alignment) and recompiled in the middle of a timed pass on the H200 (BENCHMARKS.md)
COMPILED_WIDTH_MULTIPLE = 8
DROPOUT_MASKS = "per-example (seed, epoch, example index) stream over every LoRA input"


def tokenize_dataset(loaded: LoadedModel, data: OnPolicyData, protocol: Protocol) -> list[TokenizedExample]:
    check_marker_round_trip(loaded.tokenizer, protocol.marker)
    return [build_example(loaded.tokenizer, loaded.end_of_turn_id, e["system_prompt"], e["question"], e["answer"],
                          e["is_positive"], protocol.marker, protocol.marker_tail_tokens,
                          protocol.train.max_seq_len) for e in data.examples]


def collate(examples: list[TokenizedExample], pad_id: int, device, multiple: int = 1) -> dict[str, torch.Tensor]:
    """Right padding; padded label positions are IGNORE. Shapes [rows, width] (int64), width rounded up to a
    multiple of `multiple` (exact: right padding is never read at a supervised position)."""
    width = -(-max(len(e.input_ids) for e in examples) // multiple) * multiple
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def supervised_loss_sum(model, batch: dict[str, torch.Tensor], full_logits: bool = False) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over supervised positions, and how many there were (one adapter or none).

    Fast path: run the decoder, then the LM head only at the few positions whose NEXT token is supervised
    (a paper example has ~1,000 positions but 1-5 supervised ones; the head is vocab x hidden per position).
    `full_logits=True` is the naive path (logits everywhere), kept to prove the two are equal."""
    sums = block_loss_sums(model, batch, 1, full_logits)
    return sums[0], int((batch["labels"][:, 1:] != IGNORE).sum())


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits in fp32 for the cross-entropy; fp32 and float64 (the CPU tests) as they are."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def block_loss_sums(model, batch: dict[str, torch.Tensor] | PackedBatch, k: int,
                    full_logits: bool = False) -> torch.Tensor:
    """Summed supervised cross-entropy of each of k cell blocks: [k], float32 (float64 for a float64 model: the CPU
    tests). `batch` is a padded dict (collate:
    k equal row blocks) or a PackedBatch (core/packing.py: one row, repeated here once per block; the model must be
    in `packed_attention` mode). Raises RuntimeError for a packed batch on a model not in that mode."""
    packed = isinstance(batch, PackedBatch)
    if packed:
        if not is_packed(unwrap_peft(model)):
            raise RuntimeError("a packed batch needs the model in packed_attention mode (core/packing.py); without "
                               "it the examples of the row would attend to each other")
        inputs = packing.model_kwargs(batch, k)
    else:
        inputs = {"input_ids": batch["input_ids"]}
    if full_logits:
        labels = batch.labels.repeat(k, 1) if packed else batch["labels"]
        targets = labels[:, 1:]
        mask = {} if packed else {"attention_mask": batch["attention_mask"]}
        logits = model(**inputs, **mask, use_cache=False).logits
        per_pos = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                                  ignore_index=IGNORE, reduction="none").view(targets.shape)
        return per_pos.sum(1).view(k, labels.shape[0] // k).sum(1)
    base = unwrap_peft(model)
    # No attention mask: padded batches are right-padded (collate), so under the causal mask a real token only
    # ever attends to real tokens and the padding mask changes nothing at the positions the loss reads; without it
    # SDPA can take its flash kernel instead of the masked "efficient" one (the largest GPU cost of a SmolLM2 step,
    # BENCHMARKS.md); packed batches attend per example (core/packing.py: that right-padded SDPA on a grid, or
    # varlen flash attention on the packed row on CUDA).
    # use_cache=False: transformers would build a KV cache that training never reads.
    hidden = base.get_decoder()(**inputs, use_cache=False).last_hidden_state
    if packed:
        # the supervised positions come with the batch (host-built): no nonzero, which would wait for the GPU
        # (and which a CUDA graph cannot hold); padded slots are position 0 with target IGNORE: they add 0
        picked = hidden[:, batch.sup_pos]                                           # [k, S, hidden]
        logits = _at_least_fp32(base.get_output_embeddings()(picked))              # [k, S, vocab]
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.sup_target.repeat(k),
                                 ignore_index=IGNORE, reduction="none")
        return losses.view(k, -1).sum(1)
    targets = batch["labels"][:, 1:]
    rows_per_block = targets.shape[0] // k
    rows, cols = (targets != IGNORE).nonzero(as_tuple=True)  # position t predicts token t+1
    logits = _at_least_fp32(base.get_output_embeddings()(hidden[rows, cols]))
    losses = F.cross_entropy(logits, targets[rows, cols], reduction="none")
    return torch.zeros(k, device=losses.device, dtype=losses.dtype).index_add_(0, rows // rows_per_block, losses)


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """LR multiplier (same curve as transformers' get_cosine_schedule_with_warmup)."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def schedule_plan(n_examples: int, protocol: Protocol, epochs: int) -> tuple[int, int, int]:
    """(steps per epoch, total steps, warmup steps) of one cell."""
    steps_per_epoch = math.ceil(n_examples / protocol.train.effective_batch)
    total = steps_per_epoch * epochs
    warmup = math.ceil(protocol.train.warmup_ratio * total)  # HF Trainer rounds up too
    return steps_per_epoch, total, warmup


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n, generator=g).tolist()


def micro_batches(batch: list, micro: int, length=lambda e: len(e.input_ids), max_tokens: int = 0) -> list[list]:
    """Length-bucketed split of one effective batch: sort by length, then cut. max_tokens > 0: each micro-batch
    takes examples while their tokens stay within max_tokens (at least one example each; `micro` is then
    ignored: a packed forward's memory grows with its tokens, not its examples); else `micro` examples each.
    Exact: the loss is a sum over examples, so the split does not change it."""
    ordered = sorted(batch, key=length)
    if max_tokens <= 0:
        return [ordered[i:i + micro] for i in range(0, len(ordered), micro)]
    out: list[list] = []
    tokens = 0
    for e in ordered:
        if out and tokens + length(e) <= max_tokens:
            out[-1].append(e)
            tokens += length(e)
        else:
            out.append([e])
            tokens = length(e)
    return out


def library_versions() -> dict[str, str]:
    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


def nonzero_lr_steps(total_steps: int, warmup: int) -> int:
    return sum(cosine_with_warmup(s, total_steps, warmup) > 0 for s in range(total_steps))


def train_cell(loaded: LoadedModel, examples: list[TokenizedExample], protocol: Protocol, cell: Cell, seed: int,
               out_dir: str | Path, data_hash: str = "", full_logits: bool = False,
               progress: Callable[[str], None] | None = None, checkpointer: Checkpointer | None = None) -> dict:
    """One cell: `train_cells` with N = 1 (same files, same record)."""
    return train_cells(loaded, examples, protocol, [cell], seed, [out_dir], data_hash=data_hash,
                       full_logits=full_logits, progress=progress,
                       checkpointers=None if checkpointer is None else [checkpointer])[0]


class CellSchedule:
    """One cell's LR schedule (`cosine_with_warmup` times the cell's LR) with the fields of torch's LambdaLR state
    dict, which a checkpoint's scheduler.pt holds. lr(step) is the LR of optimizer step `step` (0-based): what
    LambdaLR.get_last_lr() returned before that step."""

    def __init__(self, base_lr: float, total_steps: int, warmup_steps: int):
        self.base_lr, self.total, self.warmup = base_lr, total_steps, warmup_steps
        self.last_epoch = 0  # optimizer steps taken (LambdaLR's name)

    def lr(self, step: int) -> float:
        return self.base_lr * cosine_with_warmup(step, self.total, self.warmup)

    def state_dict(self) -> dict:
        return {"base_lrs": [self.base_lr], "last_epoch": self.last_epoch, "_step_count": self.last_epoch + 1,
                "_last_lr": [self.lr(self.last_epoch)], "lr_lambdas": [None], "_get_lr_called_within_step": False}

    def load_state_dict(self, sd: dict) -> None:
        """Raises ValueError on a state without a position (`last_epoch`)."""
        if "last_epoch" not in sd:
            raise ValueError("scheduler state has no last_epoch")
        self.last_epoch = int(sd["last_epoch"])


def _adamw_group(lr: float, protocol: Protocol) -> dict:
    """The param-group fields torch.optim.AdamW records for one cell (what a checkpoint's optimizer.pt holds)."""
    t = protocol.train
    return {"lr": lr, "initial_lr": lr, "betas": (t.adam_beta1, t.adam_beta2), "eps": t.adam_eps,
            "weight_decay": t.weight_decay, "amsgrad": False, "maximize": False, "foreach": None,
            "capturable": False, "differentiable": False, "fused": None, "decoupled_weight_decay": True}


@contextlib.contextmanager
def _training_mode(model, gradient_checkpointing: bool, tf32: bool):
    """train() + optional gradient checkpointing on the shared base, TF32 matmuls on CUDA, for the duration;
    undone afterwards. TF32: peft keeps the LoRA adapters in fp32 over a bf16 base, and their fp32 matmuls would
    otherwise skip the tensor cores (measured +22% on a 5-cell SmolLM2 pass, BENCHMARKS.md); the inputs are bf16
    activations already, the master weights and the optimizer stay fp32."""
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    model.train()
    if gradient_checkpointing:
        # non-reentrant: needs no input grads, and the recomputed forward sees the same (precomputed) masks
        # (activation_checkpointing_* is the name transformers 5 uses; gradient_checkpointing_* is deprecated there)
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        if gradient_checkpointing:
            (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        model.eval()
        torch.backends.cuda.matmul.allow_tf32 = old_tf32


@contextlib.contextmanager
def _compiled_layers(model, backend: str | None):
    """For the duration, every decoder layer runs through torch.compile(backend, dynamic=True) (nothing if backend
    is None; core/compiled_layers.py). Since the LoRA bank gives each module its own dropout-mask tensor
    (LoraBank.set_masks; no per-layer integers in the graph), one compiled graph serves all layers.
    dynamic=True: sequence width, rows and cells per forward are symbolic (sizes 0 and 1 are specialised, so a
    forward of ONE cell is a second graph; a bank of another size is another). Undone on exit: the model's later
    users (generation) get the eager layers back."""
    if backend is None:
        yield
        return
    base = unwrap_peft(model)
    # the first layer's input (frozen embeddings) would not require grad and the others' would: two graphs per
    # layer class. transformers' own switch makes the embeddings' output require grad (no parameter changes; the
    # extra gradient is one layer's input-grad matmuls, ~1/30 of a 30-layer backward)
    base.enable_input_require_grads()
    try:
        with compiled_decoder_layers(model, backend, dynamic=True):
            yield
    finally:
        base.disable_input_require_grads()


def _micro_batch(loaded: LoadedModel, bank: LoraBank, examples, mb: list[int], seed: int, epoch: int,
                 multiple: int) -> PackedBatch:
    """Examples `mb` (indices) packed into one row (core/packing.py); their dropout masks for `epoch` are
    set on the bank (LoraBank.set_masks)."""
    return train_graphs.plain_micro_batch(bank, [examples[i] for i in mb], [example_key(seed, epoch, i) for i in mb],
                                          loaded.tokenizer.pad_token_id, loaded.device, multiple)


def _forward(loaded: LoadedModel, bank: LoraBank, b: PackedBatch, cells: list[int], full_logits: bool) -> torch.Tensor:
    """One forward of packed micro-batch `b` for `cells` (its row repeated once per cell): loss sums, float32
    [len(cells)]."""
    bank.set_batch(cells)
    return block_loss_sums(loaded.model, b, len(cells), full_logits)


def _warm_compile(loaded: LoadedModel, bank: LoraBank, examples, idx: list[int], epoch: int, seed: int,
                  micro: int, max_tokens: int, active: list[int]) -> float:
    """Compile before the clock starts: one forward + backward of the pass's first forward, gradients discarded
    (no optimizer step, the dropout masks are keyed, so the training that follows is unchanged). Seconds spent."""
    t = time.perf_counter()
    mb = micro_batches(idx, micro, length=lambda i: len(examples[i].input_ids), max_tokens=max_tokens)[0]
    b = _micro_batch(loaded, bank, examples, mb, seed, epoch, COMPILED_WIDTH_MULTIPLE)
    _forward(loaded, bank, b, active, False).sum().backward()
    bank.zero_grad()
    bank.set_masks(None)
    if loaded.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def _plan_batches(loaded: LoadedModel, bank: LoraBank, examples: list[TokenizedExample], protocol: Protocol,
                  n_cells: int, n_training: int, seed: int, full_logits: bool) -> batch_plan.BatchPlan:
    """Measure activation bytes per token on the longest example, then size micro-batch x cells per forward for
    the `n_training` cells (of `n_cells`, which all hold optimizer state) that have steps left."""
    longest = max(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    b = _micro_batch(loaded, bank, examples, [longest], seed, 0, 1)
    bank.set_batch([0])
    saved = batch_plan.saved_activation_bytes(lambda: block_loss_sums(loaded.model, b, 1, full_logits),
                                              loaded.model)
    bank.set_masks(None)
    n_tokens = b.tokens
    per_token = int(batch_plan.BACKWARD_MARGIN * saved / n_tokens)
    # the cells' gradients and AdamW moments are allocated already (LoraBank.grads, BankAdamW): nothing to come
    budget = batch_plan.memory_budget(loaded.device, 0)
    measured = batch_plan.BatchPlan(0, 0, "protocol" if protocol.train.micro_batch else "auto", per_token, budget,
                                    n_tokens)
    micro, cells, max_tokens = _cut(measured, protocol, n_training)
    return dataclasses.replace(measured, micro_batch=micro, cells_per_forward=cells, tokens_per_forward=max_tokens)


def _cut(bp: batch_plan.BatchPlan, protocol: Protocol, n_active: int) -> tuple[int, int, int]:
    """(micro-batch, cells per forward, token cap of a packed micro-batch; 0 = `micro` examples each) for the
    cells still training: re-planned as cells finish, so the rows the budget holds go to the cells that are
    left. An explicit train.micro_batch fixes the examples per forward (no token cap)."""
    micro, cells = batch_plan.plan(n_active, protocol.train.effective_batch, bp.activation_bytes_per_token,
                                   bp.longest_example_tokens, bp.budget_bytes, micro=protocol.train.micro_batch)
    if protocol.train.micro_batch:
        return micro, cells, 0
    return micro, cells, batch_plan.tokens_per_forward(bp.activation_bytes_per_token, bp.budget_bytes, cells)


def train_cells(loaded: LoadedModel, examples: list[TokenizedExample], protocol: Protocol, cells: Sequence[Cell],
                seed: int, out_dirs: Sequence[str | Path], data_hash: str = "", full_logits: bool = False,
                progress: Callable[[str], None] | None = None,
                checkpointers: Sequence[Checkpointer] | None = None,
                on_cell_done: Callable[[int, dict], None] | None = None, allow_tf32: bool = True,
                lora_autocast: bool = True, compile_backend: str | None = None,
                cuda_graphs: bool | None = None) -> list[dict]:
    """Train every cell of `cells` (any LRs, any epochs) in one pass over the data and write cell j's adapter
    (adapter_config.json + adapter_model.safetensors, a standard PEFT directory) and run record
    (train_run.json) into out_dirs[j]. Returns the run records in the order of `cells`. The shared base model is
    left exactly as it was.

    checkpointers[j] (core/checkpoint.py), optional: resume cell j from its checkpoint (cells may resume from
    different steps), write one every `protocol.train.checkpoint_every_steps` steps, and on SIGTERM or SIGINT one per
    unfinished cell before raising TrainingInterrupted.
    lora_autocast: over a bf16 base, run the adapters' matmuls in bf16 (as the seed's autocast did; core/lora_bank.py);
    False = peft's fp32 path. allow_tf32: TF32 for fp32 matmuls on CUDA.
    compile_backend: None = eager (the pipeline's default); else every decoder layer (with the LoRA bank inside) runs through
    torch.compile(backend=compile_backend, dynamic=True) ("inductor" on a GPU: fused elementwise kernels and far
    fewer launches, BENCHMARKS.md; "aot_eager" in the CPU tests). Same arithmetic; the loss head, the dropout
    masks and the optimizer stay eager. Time spent compiling is recorded (compile_s) and not counted as training.
    cuda_graphs: each micro-batch's forward + backward replayed as a CUDA graph (core/train_graphs.py: static
    shapes, padding in segments of its own; same arithmetic). None = ZLT_TRAIN_CUDA_GRAPHS (`auto`: on CUDA for
    models under 1B parameters, without gradient checkpointing); True off CUDA = emulated graphs (tests). What the
    graphs did is in each record (`cuda_graphs`), with the reason where they were off or stopped.
    on_cell_done(j, record), optional: called as soon as cell j has finished and its directory is written (a cell
    with fewer epochs finishes early; the pipeline commits it then, so a later crash of the pass never retrains it).
    Raises ValueError on empty data, duplicate or invalid cells, shared output directories or mismatched lengths;
    FloatingPointError if a loss stops being finite (naming the cell)."""
    if not examples:
        raise ValueError("no training examples: the on-policy data is empty")
    if not cells or len(cells) != len(out_dirs):
        raise ValueError(f"need one output directory per cell: {len(cells)} cells, {len(out_dirs)} directories")
    if len(set(cells)) != len(cells):
        raise ValueError(f"duplicate cells in one training group: {[c.key for c in cells]}")
    for c in cells:  # what Protocol.validate checks for a sweep's grid, for callers of the API
        if not (is_finite_number(c.lr) and c.lr > 0) or \
                not (isinstance(c.epochs, int) and not isinstance(c.epochs, bool) and c.epochs >= 1):
            raise ValueError(f"cell {c.key}: expected a finite lr > 0 and an integer epochs >= 1")
    if len({str(Path(d).resolve()) for d in out_dirs}) != len(out_dirs):
        raise ValueError("two cells share an output directory; each cell writes its own adapter")
    if checkpointers is not None and len(checkpointers) != len(cells):
        raise ValueError(f"need one checkpointer per cell: {len(cells)} cells, {len(checkpointers)} checkpointers")
    order = sorted(range(len(cells)), key=lambda j: -cells[j].epochs)
    if order != list(range(len(cells))):
        # bank slots by epochs, most first: cells finish in reverse slot order, so the cells still training are
        # always the first slots and their adapters plain slices of the bank (no gather, core/lora_bank.py)
        done = None if on_cell_done is None else (lambda jj, rec: on_cell_done(order[jj], rec))
        recs = train_cells(loaded, examples, protocol, [cells[j] for j in order], seed, [out_dirs[j] for j in order],
                           data_hash=data_hash, full_logits=full_logits, progress=progress,
                           checkpointers=None if checkpointers is None else [checkpointers[j] for j in order],
                           on_cell_done=done, allow_tf32=allow_tf32, lora_autocast=lora_autocast,
                           compile_backend=compile_backend, cuda_graphs=cuda_graphs)
        by_cell: list[dict] = [{}] * len(cells)
        for jj, j in enumerate(order):
            by_cell[j] = recs[jj]
        return by_cell
    t, k, dev = protocol.train, len(cells), loaded.device
    plans = [schedule_plan(len(examples), protocol, c.epochs) for c in cells]
    steps_per_epoch = plans[0][0]
    lr_steps = [nonzero_lr_steps(total, warm) for _, total, warm in plans]
    for cell, (_, total, _), n_lr in zip(cells, plans, lr_steps):
        # warmup starts at LR 0 (the HF schedule): a cell of ONE optimizer step never leaves its initialisation
        if n_lr == 0 and progress is not None:
            progress(f"warning: cell {cell.key}: all {total} optimizer step(s) are warmup at LR 0 "
                     f"({len(examples)} examples / effective batch {t.effective_batch} x {cell.epochs} epoch(s)); "
                     "the adapter will equal its initialisation")
    fingerprints = [{"cell": c.key, "seed": seed, "data_hash": data_hash, "protocol_hash": protocol.config_hash(),
                     "base_model": loaded.base_model, "n_examples": len(examples), "total_steps": plans[j][1],
                     "full_logits": full_logits, "dropout_masks": DROPOUT_MASKS} for j, c in enumerate(cells)]
    cks = list(checkpointers) if checkpointers else [None] * k
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if cuda_graphs is None:
        graphs_off = train_graphs.graphs_reason(dev, loaded.model, t.gradient_checkpointing,
                                                settings.train_cuda_graphs())
    else:
        graphs_off = None if cuda_graphs else "cuda_graphs=False"
    with contextlib.ExitStack() as stack:
        stack.enter_context(train_graphs.pass_stream(dev, graphs_off is None))
        bank = LoraBank(loaded.model, protocol, seed, k)
        bank.routing.autocast = lora_autocast
        stack.enter_context(bank)
        # the bank's Parameters are [K, ...] views into one buffer with their .grad pre-set as the matching views
        # (core/lora_bank.py): autograd accumulates into them in place as intended, but warns once that strided
        # gradients are outside its "layout contract" (a performance hint for dense parameters)
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")
        tf32 = allow_tf32 and dev.type == "cuda"
        lora_matmul = ("bf16 (autocast)" if lora_autocast and loaded.dtype in (torch.bfloat16, torch.float16)
                       else "tf32" if tf32 else "fp32")
        stack.enter_context(_training_mode(loaded.model, t.gradient_checkpointing, tf32))
        stack.enter_context(packed_attention(unwrap_peft(loaded.model)))  # micro-batches are packed rows
        compile_s = 0.0
        adamw = BankAdamW(bank.weights, bank.grads, (t.adam_beta1, t.adam_beta2), t.adam_eps, t.weight_decay)
        opts = [adamw.cell_optimizer(j, bank.layout, _adamw_group(c.lr, protocol)) for j, c in enumerate(cells)]
        scheds = [CellSchedule(c.lr, plans[j][1], plans[j][2]) for j, c in enumerate(cells)]
        states = [(ck.restore(bank.params(j), opts[j], scheds[j], fingerprints[j]) if ck else None) or TrainState()
                  for j, ck in enumerate(cks)]
        multiple = COMPILED_WIDTH_MULTIPLE if compile_backend else 1
        # before the memory plan reads free memory: the runner's dropout-mask buffer (graphs) is allocated here
        runner = train_graphs.MicroBatches(
            loaded.model, bank, loaded.tokenizer.pad_token_id, dev, loss_sums=block_loss_sums,
            full_logits=full_logits, multiple=multiple, graphs=graphs_off is None,
            lengths=[len(e.input_ids) for e in examples], effective_batch=t.effective_batch, reason=graphs_off,
            progress=progress)
        stack.callback(runner.close)
        bp = _plan_batches(loaded, bank, examples, protocol, k,
                           sum(st.step < p[1] for st, p in zip(states, plans)) or 1, seed, full_logits)
        if progress:
            size = (f"packed micro-batches of <= {bp.tokens_per_forward:,} tokens" if bp.tokens_per_forward
                    else f"micro-batch {bp.micro_batch}")
            progress(f"training {k} cell(s) in one pass: {size} x {bp.cells_per_forward} "
                     f"cell(s) per forward ({bp.source}; {bp.activation_bytes_per_token / 2**10:.0f} KiB/token, "
                     f"longest example {bp.longest_example_tokens} tokens, budget {bp.budget_bytes / 2**30:.1f} GiB)")
        stack.enter_context(_compiled_layers(loaded.model, compile_backend))  # after the (eager) memory probe
        runner.activation_bytes_per_token = bp.activation_bytes_per_token
        if progress:
            progress("CUDA graphs: " + ("each micro-batch's forward + backward, captured per shape" if graphs_off is None
                                        else f"off ({graphs_off})"))
        records: list[dict | None] = [None] * k
        # how the pass's steps were really cut (packed micro-batches vary with the examples' lengths): run record
        packed = {"steps": 0, "micro_batches": 0, "examples": 0, "largest_tokens": 0}

        def finish(j: int) -> dict:
            """Cell j is done: write its PEFT directory and run record (the bank is detached meanwhile), free
            its optimizer state, tell the caller."""
            with bank.detached(), packing.unpacked_attention(unwrap_peft(loaded.model)):
                bank.save_peft(j, out_dirs[j], loaded.base_model)
            loaded.model.train()  # saving through peft leaves the base in eval mode
            rec = _record(loaded, protocol, cells, j, seed, states[j], plans[j], lr_steps[j], bp, len(examples),
                          data_hash, full_logits, states, lora_matmul, packed)
            rec["compile"] = {"backend": compile_backend, "compile_s": round(compile_s, 3)}
            rec["cuda_graphs"] = runner.stats.to_dict()
            (Path(out_dirs[j]) / "train_run.json").write_text(json.dumps(rec, indent=1))
            if on_cell_done is not None:
                on_cell_done(j, rec)
            return rec

        for j in range(k):  # restored at its last step (nothing left to train)
            if states[j].step >= plans[j][1]:
                records[j] = finish(j)
        if any(cks):
            stack.enter_context(stop_signal_flags([c for c in cks if c]))
        first, last = min(s.step for s in states), max(p[1] for p in plans)
        if compile_backend is not None and first < last:
            epoch0, s0 = divmod(first, steps_per_epoch)
            active0 = [j for j in range(k) if states[j].step == first < plans[j][1]]
            micro0, per_forward0, tokens0 = _cut(bp, protocol, len(active0))
            compile_s = _warm_compile(
                loaded, bank, examples,
                epoch_order(len(examples), seed, epoch0)[s0 * t.effective_batch:(s0 + 1) * t.effective_batch],
                epoch0, seed, micro0, tokens0, active0[:per_forward0])
            if progress:
                progress(f"compiled the decoder layers ({compile_backend}) in {compile_s:.1f} s")
        t0 = time.perf_counter()
        order, order_epoch = None, -1
        for g in range(first, last):
            epoch, s = divmod(g, steps_per_epoch)
            active = [j for j in range(k) if states[j].step == g < plans[j][1]]
            if not active:
                continue
            if order_epoch != epoch:
                order, order_epoch = epoch_order(len(examples), seed, epoch), epoch
            idx = order[s * t.effective_batch:(s + 1) * t.effective_batch]
            n_sup = sum(len(examples[i].supervised_positions) for i in idx)
            step_loss = torch.zeros(k, device=dev)
            step_tokens = 0
            micro, per_forward, max_tokens = _cut(bp, protocol, len(active))
            if per_forward < len(active):
                # cells split over forwards = memory-bound: a graph's pool beside the next chunk's first (eager)
                # run would hold two forwards' activations at once
                runner.give_up(f"{len(active)} cells split over forwards of {per_forward} (memory-bound)")
            runner.begin_step(active)
            packed["steps"] += 1
            for mb in micro_batches(idx, micro, length=lambda i: len(examples[i].input_ids), max_tokens=max_tokens):
                b = runner.load([examples[i] for i in mb], [example_key(seed, epoch, i) for i in mb], n_sup,
                                max_tokens)
                packed["micro_batches"] += 1
                packed["examples"] += len(mb)
                packed["largest_tokens"] = max(packed["largest_tokens"], b.real_tokens)
                step_tokens += b.real_tokens
                for c0 in range(0, len(active), per_forward):
                    chunk = active[c0:c0 + per_forward]
                    step_loss[chunk] += runner.run(chunk) / n_sup
            runner.release()  # free the last micro-batch's masks before the optimizer step
            norms = adamw.clip_(active, t.grad_clip)
            lrs = [scheds[j].lr(g) for j in active]
            adamw.step(active, lrs)
            bank.zero_grad(active)
            for j in active:  # the positions torch's LambdaLR / AdamW would record (a checkpoint holds them)
                scheds[j].last_epoch = g + 1
                opts[j].group["lr"] = scheds[j].lr(g + 1)
            losses, norms = step_loss[active].tolist(), norms.tolist()  # one host sync per optimizer step
            for j, loss, norm, lr_now in zip(active, losses, norms, lrs):
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss} at step {g + 1} (cell {cells[j].key})")
                st = states[j]
                st.step, st.tokens, st.supervised = g + 1, st.tokens + step_tokens, st.supervised + n_sup
                st.curve.append({"step": g + 1, "epoch": epoch + 1, "loss": round(loss, 5), "lr": lr_now,
                                 "grad_norm": round(norm, 5)})
            elapsed = time.perf_counter() - t0  # after the host sync above: the step's real time
            t0 = time.perf_counter()
            for j in active:  # the step's time, shared equally by the cells it trained
                states[j].wall_s += elapsed / len(active)
            if any(cks):
                for j in active:
                    if cks[j]:
                        cks[j].after_step(bank.params(j), opts[j], scheds[j], states[j], fingerprints[j],
                                          plans[j][1], interrupt=False)
                stopping = [j for j in active if cks[j] and cks[j].stop_signal is not None
                            and states[j].step < plans[j][1]]
                if stopping:
                    raise cks[stopping[0]].interrupted(g + 1, max(plans[j][1] for j in stopping))
                t0 = time.perf_counter()  # checkpoint writes are not training time
            finished = [j for j in active if states[j].step == plans[j][1]]
            for j in finished:
                records[j] = finish(j)
            if finished:
                t0 = time.perf_counter()  # writing adapters (and the caller's commit) is not training time either
            if progress and s == steps_per_epoch - 1:
                left = sum(p[1] - st.step for p, st in zip(plans, states))  # cell-steps still to train
                spent = sum(st.wall_s for st in states)
                done = sum(st.step - (st.resumed_from_step or 0) for st in states)
                eta = f"; ETA {spent / done * left / 60:.1f} min" if done and left else ""
                progress(f"epoch {epoch + 1}/{max(c.epochs for c in cells)}: {len(active)} cell(s) trained, loss "
                         + ", ".join(f"{cells[j].key} {states[j].curve[-1]['loss']:.4f}" for j in active) + eta)
        sync()
    return records


def _record(loaded, protocol, cells, j, seed, state, plan, lr_steps, bp, n_examples, data_hash, full_logits,
            states, lora_matmul: str, packed: dict) -> dict:
    """The run record of cell j. wall_s / gpu_s = its share of the pass (each step's time split equally among the
    cells that step trained); `group` = the pass so far (all cells, tokens and wall time up to now)."""
    steps_per_epoch, total, warmup = plan
    st = state
    group_tokens, group_wall = sum(x.tokens for x in states), sum(x.wall_s for x in states)
    return {
        "cell": {"lr": cells[j].lr, "epochs": cells[j].epochs, "key": cells[j].key}, "seed": seed,
        "steps": st.step, "steps_per_epoch": steps_per_epoch, "warmup_steps": warmup, "n_examples": n_examples,
        "steps_with_nonzero_lr": lr_steps,
        "tokens": st.tokens, "supervised_tokens": st.supervised, "wall_s": round(st.wall_s, 3),
        "tokens_per_s": round(st.tokens / st.wall_s, 1) if st.wall_s > 0 else None,
        "gpu_s": round(st.wall_s, 3) if loaded.device.type == "cuda" else 0.0,
        "first_loss": st.curve[0]["loss"] if st.curve else None,
        "final_loss": st.curve[-1]["loss"] if st.curve else None, "loss_curve": st.curve,
        "micro_batch": bp.micro_batch, "cells_per_forward": bp.cells_per_forward, "batch_plan": bp.to_dict(),
        # micro_batch is the plan's guaranteed minimum; packed micro-batches capped by tokens hold more: what the
        # pass so far really ran (micro-batches per optimizer step, examples per micro-batch, the largest's tokens)
        "micro_batches": {"per_step": round(packed["micro_batches"] / packed["steps"], 2) if packed["steps"] else None,
                          "examples_each": (round(packed["examples"] / packed["micro_batches"], 2)
                                            if packed["micro_batches"] else None),
                          "largest_tokens": packed["largest_tokens"]},
        "group": {"cells": [c.key for c in cells], "n_cells": len(cells), "wall_s": round(group_wall, 3),
                  "tokens_per_s": round(group_tokens / group_wall, 1) if group_wall > 0 else None},
        "dropout_masks": DROPOUT_MASKS, "lora_matmul": lora_matmul,
        "device": device_label(loaded.device), "dtype": str(loaded.dtype).replace("torch.", ""),
        "loss_path": "full_logits" if full_logits else "supervised_logits",
        "resumed_from_step": st.resumed_from_step, "segments": st.segments,
        "checkpoints_written": st.checkpoints_written,
        "data_hash": data_hash, "versions": library_versions(), "protocol": protocol.to_dict(),
        "protocol_hash": protocol.config_hash(), "base_model": loaded.base_model,
    }
