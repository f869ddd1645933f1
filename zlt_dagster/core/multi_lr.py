"""Fused multi-LR training (issue 6): the LR cells of a sweep that share an epochs value, trained in one pass.

Why it is exact: in `train.train_cell` the batches, their order and the LoRA initialisation depend on the seed
and the epochs only, never on the LR. So K cells with the same epochs see the same micro-batches in the same
order. Here every micro-batch is repeated K times along the batch dimension (block k = cell k) and every LoRA'd
Linear carries K adapters; row block k only ever goes through adapter k ("per-example adapter routing"), so the
summed loss sum_k loss_k has d/d(adapter k) = d loss_k / d(adapter k). Each cell then gets its own AdamW, LR
schedule and grad-norm clip, exactly as in train_cell. With LoRA dropout 0 the result equals K separate
`train_cell` runs up to float rounding (tests/core/test_fast_paths.py); with dropout > 0 every cell still draws
independent dropout masks, so the cells are equal in distribution but not bitwise (the RNG stream differs).

What it buys: one forward/backward of K x micro_batch rows instead of K of micro_batch rows. The base FLOPs are
the same (the adapters make the cells' activations differ after the first layer), so it pays where a single
cell cannot fill the GPU (small models, launch-bound), not for a 7B model at batch 16 x ~400 tokens.
Memory grows K-fold in activations. Gradient checkpointing is not supported on this path.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .masking import IGNORE, TokenizedExample
from .models import LoadedModel
from .protocol import Cell, Protocol
from .train import (_fix_adapter_base_name, collate, cosine_with_warmup, epoch_order, library_versions, lora_config,
                    micro_batches, schedule_plan)


class MultiLoRALinear(torch.nn.Module):
    """A frozen Linear plus K LoRA adapters; input rows come in K equal contiguous blocks, block k uses adapter k.
    Same arithmetic as peft's LoRA Linear: base(x) + B_k(A_k(dropout(x in the adapter dtype))) * scale, cast back."""

    def __init__(self, base: torch.nn.Linear, a_init: torch.Tensor, b_init: torch.Tensor, k: int, scale: float,
                 dropout: float):
        super().__init__()
        self.base = base
        self.k = k
        self.scale = scale
        # the dtype peft chose for the adapter (fp32 over a bf16 base: peft's autocast_adapter_dtype)
        self.lora_A = torch.nn.ParameterList([torch.nn.Parameter(a_init.detach().clone()) for _ in range(k)])
        self.lora_B = torch.nn.ParameterList([torch.nn.Parameter(b_init.detach().clone()) for _ in range(k)])
        self.dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        dtype = result.dtype
        rows = x.shape[0]
        if rows % self.k:
            raise ValueError(f"batch of {rows} rows does not split into {self.k} cell blocks")
        xs = self.dropout(x.to(self.lora_A[0].dtype)).reshape(self.k, -1, x.shape[-1])
        a = torch.stack(list(self.lora_A))                   # [K, r, in]
        b = torch.stack(list(self.lora_B))                   # [K, out, r]
        delta = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2)) * self.scale
        return (result + delta.reshape(result.shape)).to(dtype)


def _initial_lora(loaded: LoadedModel, protocol: Protocol, seed: int) -> tuple[dict, float, float]:
    """The LoRA initialisation train_cell would draw for this seed: {module name: (A, B)}, scale, dropout."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(loaded.model, lora_config(protocol))
    try:
        init, scale, dropout = {}, None, protocol.lora.dropout
        for name, mod in pm.get_base_model().named_modules():
            if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                init[name] = (mod.lora_A["default"].weight.detach().clone(),
                              mod.lora_B["default"].weight.detach().clone())
                scale = mod.scaling["default"]
    finally:
        pm.unload()
    if not init:
        raise RuntimeError("peft attached no LoRA modules; nothing to train")
    return init, float(scale), float(dropout)


def _set_module(root: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def _save_cell_adapter(loaded: LoadedModel, protocol: Protocol, wrapped: dict[str, MultiLoRALinear], k: int,
                       out_dir: Path) -> None:
    """Write cell k's adapter as a standard PEFT directory (the same files train_cell writes)."""
    from peft import get_peft_model

    pm = get_peft_model(loaded.model, lora_config(protocol))
    try:
        mods = dict(pm.get_base_model().named_modules())
        with torch.no_grad():
            for name, w in wrapped.items():
                mods[name].lora_A["default"].weight.copy_(w.lora_A[k])
                mods[name].lora_B["default"].weight.copy_(w.lora_B[k])
        pm.eval()
        out_dir.mkdir(parents=True, exist_ok=True)
        pm.save_pretrained(str(out_dir), safe_serialization=True)
        _fix_adapter_base_name(out_dir, loaded.base_model)
    finally:
        pm.unload()


def per_cell_loss_sums(model, batch: dict[str, torch.Tensor], k: int) -> tuple[list[torch.Tensor], int]:
    """The fast loss path of train.supervised_loss_sum, split by cell block: [loss sum of block j], supervised
    count of ONE block (all blocks are the same examples)."""
    targets = batch["labels"][:, 1:]
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    rows, cols = (targets != IGNORE).nonzero(as_tuple=True)  # row-major: block j's positions are contiguous
    logits = model.get_output_embeddings()(hidden[rows, cols]).float()
    tgt = targets[rows, cols]
    m = len(rows) // k
    return [F.cross_entropy(logits[j * m:(j + 1) * m], tgt[j * m:(j + 1) * m], reduction="sum") for j in range(k)], m


def train_cells_fused(loaded: LoadedModel, examples: list[TokenizedExample], protocol: Protocol,
                      cells: Sequence[Cell], seed: int, out_dirs: Sequence[str | Path], data_hash: str = "",
                      progress: Callable[[str], None] | None = None, save: bool = True) -> list[dict]:
    """Train several cells with one epochs value together; one run record per cell (the same fields as
    train_cell's, plus `fused_cells` and the shared wall time). The shared base is left exactly as it was."""
    if not examples:
        raise ValueError("no training examples: the on-policy data is empty")
    if not cells or len(cells) != len(out_dirs):
        raise ValueError("need one output directory per cell")
    if len({c.epochs for c in cells}) != 1:
        raise ValueError(f"fused cells must share one epochs value, got {sorted({c.epochs for c in cells})}")
    t = protocol.train
    if t.gradient_checkpointing:
        raise ValueError("fused multi-LR training does not support gradient checkpointing")
    if t.checkpoint_every_steps:
        raise ValueError("fused multi-LR training writes no resume checkpoints; run the cells with train_cell "
                         f"(checkpoint_every_steps={t.checkpoint_every_steps}) or set checkpoint_every_steps=0")
    k, epochs = len(cells), cells[0].epochs
    steps_per_epoch, total_steps, warmup = schedule_plan(len(examples), protocol, epochs)
    init, scale, dropout = _initial_lora(loaded, protocol, seed)
    base = loaded.model
    originals = {name: base.get_submodule(name) for name in init}
    wrapped = {name: MultiLoRALinear(originals[name], a, b, k, scale, dropout) for name, (a, b) in init.items()}
    for name, w in wrapped.items():
        _set_module(base, name, w)
    try:
        base.train()
        params = [[p for w in wrapped.values() for p in (w.lora_A[j], w.lora_B[j])] for j in range(k)]
        opts, scheds = [], []
        for j, cell in enumerate(cells):
            opt = torch.optim.AdamW(params[j], lr=cell.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                                    weight_decay=t.weight_decay)
            opts.append(opt)
            scheds.append(torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_with_warmup(s, total_steps, warmup)))
        curves = [[] for _ in range(k)]
        tokens, supervised, step = 0, 0, 0
        pad = loaded.tokenizer.pad_token_id
        sync = torch.cuda.synchronize if loaded.device.type == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        for epoch in range(epochs):
            order = epoch_order(len(examples), seed, epoch)
            for s in range(steps_per_epoch):
                batch = [examples[i] for i in order[s * t.effective_batch:(s + 1) * t.effective_batch]]
                n_sup = sum(len(e.supervised_positions) for e in batch)
                step_loss = [0.0] * k
                for mb in micro_batches(batch, t.micro_batch):
                    b = collate(mb, pad, loaded.device)
                    tokens += int(b["attention_mask"].sum())
                    rep = {key: v.repeat(k, 1) for key, v in b.items()}
                    sums, _ = per_cell_loss_sums(base, rep, k)
                    (torch.stack(sums).sum() / n_sup).backward()
                    for j in range(k):
                        step_loss[j] += float(sums[j].detach()) / n_sup
                for j in range(k):
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(params[j], t.grad_clip))
                    lr_now = scheds[j].get_last_lr()[0]
                    opts[j].step()
                    scheds[j].step()
                    opts[j].zero_grad(set_to_none=True)
                    if not math.isfinite(step_loss[j]):
                        raise FloatingPointError(f"loss became {step_loss[j]} at step {step + 1} (cell {cells[j].key})")
                    curves[j].append({"step": step + 1, "epoch": epoch + 1, "loss": round(step_loss[j], 5),
                                      "lr": lr_now, "grad_norm": round(grad_norm, 5)})
                supervised += n_sup
                step += 1
            if progress:
                progress(f"fused {[c.key for c in cells]}: epoch {epoch + 1}/{epochs}")
        sync()
        wall = time.perf_counter() - t0
    finally:
        for name, orig in originals.items():
            _set_module(base, name, orig)
        base.eval()
    records = []
    for j, (cell, out_dir) in enumerate(zip(cells, out_dirs)):
        out_dir = Path(out_dir)
        if save:
            _save_cell_adapter(loaded, protocol, wrapped, j, out_dir)
        rec = {
            "cell": {"lr": cell.lr, "epochs": cell.epochs, "key": cell.key}, "seed": seed,
            "steps": step, "steps_per_epoch": steps_per_epoch, "warmup_steps": warmup, "n_examples": len(examples),
            "tokens": tokens, "supervised_tokens": supervised, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1) if wall > 0 else None,
            "fused_cells": k, "fused_tokens_per_s": round(k * tokens / wall, 1) if wall > 0 else None,
            "gpu_s": round(wall / k, 3) if loaded.device.type == "cuda" else 0.0,
            "first_loss": curves[j][0]["loss"], "final_loss": curves[j][-1]["loss"], "loss_curve": curves[j],
            "device": str(loaded.device), "dtype": str(loaded.dtype).replace("torch.", ""),
            "loss_path": "supervised_logits_fused_multi_lr",
            "data_hash": data_hash, "versions": library_versions(), "protocol": protocol.to_dict(),
            "protocol_hash": protocol.config_hash(), "base_model": loaded.base_model,
        }
        if save:
            (out_dir / "train_run.json").write_text(json.dumps(rec, indent=1))
        records.append(rec)
    return records
