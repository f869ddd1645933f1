"""The keyword a transformers model's forward takes its KV cache by (used by the decode loop, the static decode and
ARC scoring)."""
from __future__ import annotations

from ..models import unwrap_peft


def cache_kwargs(model, cache) -> dict:
    """The KV cache as the keyword this transformers version's forward takes: `cache` from 5.2x (where
    `past_key_values` still works but warns that 5.40 removes it), `past_key_values` before (5.17 on the GPU
    machine)."""
    import inspect

    base = unwrap_peft(model)
    name = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    return {name: cache}
