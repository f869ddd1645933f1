"""The plain training path, kept as the reference the pipeline's trainer is measured and tested against.

One cell, peft's own LoRA modules (`get_peft_model`) with peft's nn.Dropout drawing from the global RNG, the
protocol's fixed micro-batch (the seed's 4), one AdamW, a LambdaLR cosine schedule: what zlt_dagster did before
core/train.py trained 1..N cells in one pass. Not on the pipeline's path: benchmarks/gpu_bench.py times it as
the naive side, tests/core/test_train_group.py proves the pipeline's trainer computes the same adapter
(dropout 0, float64).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from zlt_dagster.core.lora_bank import _fix_adapter_base_name, lora_config
from zlt_dagster.core.train import collate, cosine_with_warmup, epoch_order, micro_batches, schedule_plan, \
    supervised_loss_sum


def train_cell_naive(loaded, examples, protocol, cell, seed: int, out_dir, micro_batch: int = 4,
                     save: bool = True) -> dict:
    """Train one cell with peft at a fixed micro-batch; returns {steps, tokens, wall_s, tokens_per_s,
    loss_curve}. The shared base is left as it was (the LoRA layers are unloaded, never merged)."""
    from peft import get_peft_model

    t = protocol.train
    steps_per_epoch, total, warmup = schedule_plan(len(examples), protocol, cell.epochs)
    torch.manual_seed(seed)
    model = get_peft_model(loaded.model, lora_config(protocol))
    try:
        model.train()
        if t.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cell.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                                weight_decay=t.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_with_warmup(s, total, warmup))
        pad = loaded.tokenizer.pad_token_id
        curve, tokens = [], 0
        sync = torch.cuda.synchronize if loaded.device.type == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        for epoch in range(cell.epochs):
            order = epoch_order(len(examples), seed, epoch)
            for s in range(steps_per_epoch):
                batch = [examples[i] for i in order[s * t.effective_batch:(s + 1) * t.effective_batch]]
                n_sup = sum(len(e.supervised_positions) for e in batch)
                step_loss = 0.0
                for mb in micro_batches(batch, micro_batch):
                    b = collate(mb, pad, loaded.device)
                    loss_sum, _ = supervised_loss_sum(model, b)
                    (loss_sum / n_sup).backward()
                    step_loss += float(loss_sum.detach()) / n_sup
                    tokens += int(b["attention_mask"].sum())
                torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                curve.append({"step": len(curve) + 1, "loss": round(step_loss, 5)})
        sync()
        wall = time.perf_counter() - t0
        model.eval()
        if save:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            model.save_pretrained(str(out_dir), safe_serialization=True)
            _fix_adapter_base_name(Path(out_dir), loaded.base_model)
    finally:
        if t.gradient_checkpointing:
            model.gradient_checkpointing_disable()
            model.disable_input_require_grads()
        model.unload()
        loaded.model.eval()
    return {"steps": len(curve), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "loss_curve": curve}
