"""How many examples (and cells) one forward pass carries: sized at run time from free memory.

The micro-batch changes no result: the loss of an optimizer step is the sum over its micro-batches divided by
the step's supervised-token count, and dropout masks are per example (core/lora_bank.py). So the protocol fixes
the effective batch (16 examples per optimizer step, SPEC) and this module only decides how the step is cut:

    rows per forward = micro_batch x cells_per_forward <= memory budget / (activation bytes per token x longest
                                                                             example in tokens)
    tokens per forward (packed micro-batches, core/packing.py) <= memory budget / (activation bytes per token x
                                                                                   cells_per_forward)

cells_per_forward comes from the first line (every cell block must hold at least one longest example); a packed
micro-batch then takes examples, shortest first, while its tokens fit the second line (`tokens_per_forward`), so
it holds micro_batch examples or more: packing needs no slot per example at the longest example's length.

Activation bytes per token are measured, not guessed: one forward of the longest example through the attached
LoRA bank under `torch.autograd.graph.saved_tensors_hooks`, counting the bytes of every distinct tensor storage
autograd keeps for the backward pass (the same count on CPU and CUDA), times a margin for the transient buffers
of the backward pass. The budget is the device's free memory (CUDA: `torch.cuda.mem_get_info` plus the blocks
torch's allocator caches unused; CPU: MemAvailable) minus a reserve; the cells' gradients and AdamW moments are
allocated before the budget is read (core/lora_bank.py, core/bank_adamw.py).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch

from .generation.batch_size import device_memory

# backward keeps the saved activations plus transient buffers (input grads of a layer, attention workspace,
# the fp32 logits of supervised positions); measured on the tiny and SmolLM2 models, peak / saved stays < 1.6
BACKWARD_MARGIN = 1.6
CUDA_RESERVE_FRACTION = 0.10   # of total memory: allocator fragmentation, cuBLAS workspaces, other processes
CPU_BUDGET_FRACTION = 0.5      # of MemAvailable: the CPU is shared with the evaluation and Dagster


@dataclass(frozen=True)
class BatchPlan:
    """micro_batch: examples per forward; cells_per_forward: cells whose adapters share that forward (row blocks);
    how the numbers were chosen (bytes in, so the choice can be checked from the run record)."""
    micro_batch: int
    cells_per_forward: int
    source: str                         # "auto" or "protocol" (train.micro_batch set explicitly)
    activation_bytes_per_token: int = 0
    budget_bytes: int = 0
    longest_example_tokens: int = 0
    tokens_per_forward: int = 0         # packed micro-batches: token cap per cell block (0 = micro_batch examples)

    def to_dict(self) -> dict:
        return asdict(self)


def saved_activation_bytes(run_forward, model: torch.nn.Module | None = None) -> int:
    """Bytes of the distinct tensor storages autograd saves while `run_forward()` runs, not counting `model`'s
    parameters and buffers (a linear layer saves its weight for the backward pass, but the weight exists anyway
    and does not grow with the tokens). No backward is done; the graph is freed when the caller drops the output."""
    seen: dict[tuple, int] = {}
    resident = set()
    if model is not None:
        resident = {(t.device.type, t.untyped_storage().data_ptr())
                    for t in list(model.parameters()) + list(model.buffers())}

    def pack(t: torch.Tensor):
        try:
            st = t.untyped_storage()
            key = (t.device.type, st.data_ptr())
            if key not in resident:
                seen[key] = st.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without a plain storage (e.g. sparse): count as is
            seen[(t.device.type, id(t))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run_forward()
    del out
    return sum(seen.values())


def memory_budget(device: torch.device, persistent_bytes: int) -> int:
    """Bytes a forward+backward may use now: free device memory minus a reserve minus `persistent_bytes`
    (optimizer state still to be allocated). Never below 0."""
    if device.type == "cuda":
        # torch's cached-but-unused blocks count as free (the driver reports them as taken): in `zlt run` training
        # follows generation in one process, and a benchmark pass follows another; without them a pass after a
        # 64 GiB one was planned at micro-batch 1 on the H200 (16 forwards per step instead of 1)
        free, total = device_memory(device)
        return max(0, int(free - CUDA_RESERVE_FRACTION * total - persistent_bytes))
    return max(0, int(CPU_BUDGET_FRACTION * _cpu_available_bytes() - persistent_bytes))


def _cpu_available_bytes() -> int:
    """MemAvailable (free + reclaimable page cache) where the kernel reports it; else free pages (sysconf),
    which undercounts and so only errs towards smaller batches."""
    if os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def plan(n_cells: int, effective_batch: int, bytes_per_token: int, longest: int, budget: int,
         micro: int = 0) -> tuple[int, int]:
    """(micro_batch, cells_per_forward): as many rows as the budget holds, all cells in one forward first,
    then the largest micro-batch; at least 1 x 1 (which may still not fit: then the device is too small).
    `micro` > 0 fixes the micro-batch (train.micro_batch set explicitly); the budget then only sizes the cells.

    >>> plan(5, 16, 1000, 100, 100_000 * 80)   # 80 rows fit: 16 examples x 5 cells
    (16, 5)
    >>> plan(25, 16, 1000, 100, 100_000 * 30)  # 30 rows: 1 example x 25 cells
    (1, 25)
    >>> plan(25, 16, 1000, 100, 100_000 * 7)   # 7 rows: 1 example x 7 cells per forward
    (1, 7)
    >>> plan(25, 16, 1000, 100, 100_000 * 30, micro=4)  # fixed micro-batch 4: 7 cells per forward
    (4, 7)
    """
    per_row = max(1, bytes_per_token * max(1, longest))
    rows = max(1, budget // per_row)
    micro = micro or max(1, min(effective_batch, rows // max(1, n_cells)))
    cells = max(1, min(n_cells, rows // micro))
    return micro, cells


def tokens_per_forward(bytes_per_token: int, budget: int, cells: int) -> int:
    """Tokens one packed micro-batch may hold when `cells` cell blocks share its forward (each block carries all
    of them): budget / (bytes per token x cells); at least 1.

    >>> tokens_per_forward(1000, 100_000 * 80, 5)
    1600
    """
    return max(1, budget // max(1, bytes_per_token * max(1, cells)))
