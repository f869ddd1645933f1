"""Train one (LR, epochs) cell: LoRA on every linear module, marker-only loss, AdamW + cosine schedule.

Arithmetic of a paper cell: 2,200 examples / effective batch 16 = 138 optimizer steps per epoch (the last step of
an epoch takes the 8 left over), so lr=5e-6 x 20 epochs = 2,760 steps.
The loss is the mean cross-entropy over the supervised tokens of an effective batch (sum over its micro-batches
/ their supervised-token count), so the result does not depend on how the batch is split into micro-batches.
"""
from __future__ import annotations

import contextlib
import json
import math
import platform
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .checkpoint import Checkpointer, TrainState
from .masking import IGNORE, TokenizedExample, build_example, check_marker_round_trip
from .models import LoadedModel, unwrap_peft
from .onpolicy import OnPolicyData
from .protocol import Cell, Protocol


def tokenize_dataset(loaded: LoadedModel, data: OnPolicyData, protocol: Protocol) -> list[TokenizedExample]:
    check_marker_round_trip(loaded.tokenizer, protocol.marker)
    return [build_example(loaded.tokenizer, loaded.end_of_turn_id, e["system_prompt"], e["question"], e["answer"],
                          e["is_positive"], protocol.marker, protocol.marker_tail_tokens,
                          protocol.train.max_seq_len) for e in data.examples]


def collate(examples: list[TokenizedExample], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right padding; padded label positions are IGNORE."""
    width = max(len(e.input_ids) for e in examples)
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
    """Summed next-token cross-entropy over supervised positions, and how many there were.

    Fast path: run the decoder, then the LM head only at the few positions whose NEXT token is supervised
    (a paper example has ~1,000 positions but 1-5 supervised ones; the head is vocab x hidden per position).
    `full_logits=True` is the naive path (logits everywhere), kept to prove the two are equal."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    n = int((targets != IGNORE).sum())
    if full_logits:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=IGNORE, reduction="sum")
        return loss, n
    base = unwrap_peft(model)
    hidden = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    rows, cols = (targets != IGNORE).nonzero(as_tuple=True)  # position t predicts token t+1
    logits = base.get_output_embeddings()(hidden[rows, cols]).float()
    return F.cross_entropy(logits, targets[rows, cols], reduction="sum"), n


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """LR multiplier (same curve as transformers' get_cosine_schedule_with_warmup)."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def schedule_plan(n_examples: int, protocol: Protocol, epochs: int) -> tuple[int, int, int]:
    steps_per_epoch = math.ceil(n_examples / protocol.train.effective_batch)
    total = steps_per_epoch * epochs
    warmup = math.ceil(protocol.train.warmup_ratio * total)  # HF Trainer rounds up too
    return steps_per_epoch, total, warmup


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n, generator=g).tolist()


def micro_batches(batch: list[TokenizedExample], micro: int) -> list[list[TokenizedExample]]:
    """Length-bucketed split of one effective batch: sort by length so each micro-batch pads little. Exact:
    the loss is a sum over examples, so the split does not change it."""
    ordered = sorted(batch, key=lambda e: len(e.input_ids))
    return [ordered[i:i + micro] for i in range(0, len(ordered), micro)]


def lora_config(protocol: Protocol):
    from peft import LoraConfig

    lc = protocol.lora
    return LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules,
                      bias="none", task_type="CAUSAL_LM")


def library_versions() -> dict[str, str]:
    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


def train_cell(loaded: LoadedModel, examples: list[TokenizedExample], protocol: Protocol, cell: Cell, seed: int,
               out_dir: str | Path, data_hash: str = "", full_logits: bool = False,
               progress: Callable[[str], None] | None = None, checkpointer: Checkpointer | None = None) -> dict:
    """Train one cell's adapter into `out_dir` (adapter_config.json + adapter_model.safetensors) and return the
    run record (also written to out_dir/train_run.json). The shared base model is left exactly as it was.

    `checkpointer` (core/checkpoint.py): resume from its checkpoint, write one every
    `protocol.train.checkpoint_every_steps` steps, and one on SIGTERM before raising TrainingInterrupted."""
    from peft import get_peft_model

    if not examples:
        raise ValueError("no training examples: the on-policy data is empty")
    t = protocol.train
    out_dir = Path(out_dir)
    steps_per_epoch, total_steps, warmup = schedule_plan(len(examples), protocol, cell.epochs)
    # warmup starts at LR 0 (the HF schedule), so a cell of ONE optimizer step (tiny data x 1 epoch) never moves
    # its adapter off the initialisation (B = 0): say so instead of letting it pass for "nothing learned"
    lr_steps = sum(cosine_with_warmup(s, total_steps, warmup) > 0 for s in range(total_steps))
    if lr_steps == 0 and progress is not None:
        progress(f"warning: cell {cell.key}: all {total_steps} optimizer step(s) are warmup at LR 0 "
                 f"({len(examples)} examples / effective batch {t.effective_batch} x {cell.epochs} epoch(s)); "
                 "the adapter will equal its initialisation")
    torch.manual_seed(seed)  # LoRA A init and dropout masks
    model = get_peft_model(loaded.model, lora_config(protocol))
    stack = contextlib.ExitStack()
    try:
        model.train()
        if t.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cell.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                                weight_decay=t.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_with_warmup(s, total_steps, warmup))
        fingerprint = {"cell": cell.key, "seed": seed, "data_hash": data_hash, "protocol_hash": protocol.config_hash(),
                       "base_model": loaded.base_model, "n_examples": len(examples), "total_steps": total_steps,
                       "full_logits": full_logits}
        ts = (checkpointer.restore(model, opt, sched, fingerprint) if checkpointer else None) or TrainState()
        curve, tokens, supervised, step = ts.curve, ts.tokens, ts.supervised, ts.step
        pad = loaded.tokenizer.pad_token_id
        sync = torch.cuda.synchronize if loaded.device.type == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        if checkpointer:
            stack.enter_context(checkpointer.signals())  # SIGTERM -> checkpoint at the end of the step
        for epoch in range(step // steps_per_epoch, cell.epochs):  # data position: epoch, step in epoch
            order = epoch_order(len(examples), seed, epoch)
            for s in range(step % steps_per_epoch if epoch == step // steps_per_epoch else 0, steps_per_epoch):
                batch = [examples[i] for i in order[s * t.effective_batch:(s + 1) * t.effective_batch]]
                n_sup = sum(len(e.supervised_positions) for e in batch)
                step_loss = 0.0
                for mb in micro_batches(batch, t.micro_batch):
                    b = collate(mb, pad, loaded.device)
                    loss_sum, _ = supervised_loss_sum(model, b, full_logits=full_logits)
                    (loss_sum / n_sup).backward()
                    step_loss += float(loss_sum.detach()) / n_sup
                    tokens += int(b["attention_mask"].sum())
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.grad_clip))
                lr_now = sched.get_last_lr()[0]
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                supervised += n_sup
                step += 1
                if not math.isfinite(step_loss):
                    raise FloatingPointError(f"loss became {step_loss} at step {step} (cell {cell.key})")
                curve.append({"step": step, "epoch": epoch + 1, "loss": round(step_loss, 5),
                              "lr": lr_now, "grad_norm": round(grad_norm, 5)})
                if checkpointer:
                    ts.step, ts.tokens, ts.supervised = step, tokens, supervised
                    ts.wall_s += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    checkpointer.after_step(model, opt, sched, ts, fingerprint, total_steps)
            if progress:
                progress(f"{cell.key}: epoch {epoch + 1}/{cell.epochs} loss {curve[-1]['loss']:.4f}")
        sync()
        wall = ts.wall_s + time.perf_counter() - t0
        model.eval()
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out_dir), safe_serialization=True)
        _fix_adapter_base_name(out_dir, loaded.base_model)
    finally:
        stack.close()  # the previous SIGTERM handler is back
        if t.gradient_checkpointing:  # leave the shared base as we found it: the next cell may not checkpoint
            model.gradient_checkpointing_disable()
            model.disable_input_require_grads()
        model.unload()  # remove LoRA layers from the shared base (never merged, so base weights are untouched)
        loaded.model.eval()
    record = {
        "cell": {"lr": cell.lr, "epochs": cell.epochs, "key": cell.key}, "seed": seed,
        "steps": step, "steps_per_epoch": steps_per_epoch, "warmup_steps": warmup, "n_examples": len(examples),
        "steps_with_nonzero_lr": lr_steps,
        "tokens": tokens, "supervised_tokens": supervised, "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1) if wall > 0 else None,
        "gpu_s": round(wall, 3) if loaded.device.type == "cuda" else 0.0,
        "first_loss": curve[0]["loss"], "final_loss": curve[-1]["loss"], "loss_curve": curve,
        "device": str(loaded.device), "dtype": str(loaded.dtype).replace("torch.", ""),
        "loss_path": "full_logits" if full_logits else "supervised_logits",
        "resumed_from_step": ts.resumed_from_step, "segments": ts.segments,
        "checkpoints_written": ts.checkpoints_written,
        "data_hash": data_hash, "versions": library_versions(), "protocol": protocol.to_dict(),
        "protocol_hash": protocol.config_hash(), "base_model": loaded.base_model,
    }
    (out_dir / "train_run.json").write_text(json.dumps(record, indent=1))
    return record


def _fix_adapter_base_name(out_dir: Path, base_model: str) -> None:
    """peft writes the local cache path of a de-quantised GGUF; record the sweep's model name instead."""
    cfg_path = out_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = base_model
    cfg_path.write_text(json.dumps(cfg, indent=2))
