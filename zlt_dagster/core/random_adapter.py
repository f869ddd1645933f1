"""A saved PEFT LoRA adapter with random B, for speed benchmarks and tests of adapter plumbing (loading, merging,
generation with an adapter): the values do not matter there, but peft initialises B to zero, and a zero adapter
would hide an adapter that was silently not applied."""
from __future__ import annotations

from pathlib import Path

import torch


def save_random_adapter(model, config, out_dir: str | Path, b_std: float, seed: int = 0) -> str:
    """Save an adapter of `config`'s shape (a peft LoraConfig) for `model`, with A as peft initialises it (seeded)
    and B ~ N(0, b_std), into `out_dir`; return its path. Built on `model` itself and unloaded afterwards (a 7B
    model on a GPU has no room for a copy): LoRA is never merged, so the base weights are untouched."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    try:
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, b_std)
        peft_model.save_pretrained(str(out_dir))
    finally:
        peft_model.unload()
    return str(out_dir)
