"""AdamW and grad-norm clipping for many cells at once: one row per cell of a [K, P] buffer, one LR per row.

Why our own optimizer and not torch.optim.AdamW: torch's AdamW takes one learning rate per parameter tensor, so K
cells with K LRs (and K cosine schedules of K lengths) needed K optimizers over K x 420 tensors on SmolLM2, and
as many clips: per optimizer step ~K thousand kernel launches plus a gradient accumulation per tensor per cell in
every backward pass, which made a 25-cell pass slower per token than a 5-cell one (BENCHMARKS.md). Here the
update of every active cell is a few elementwise kernels over [n, P] whatever n is. The arithmetic is
torch.optim.AdamW's (decoupled weight decay; torch/optim/adamw.py, single-tensor path, same order of
operations) and torch.nn.utils.clip_grad_norm_'s (coefficient max_norm / (norm + 1e-6), clamped at 1, applied
always); tests/core/test_bank_adamw.py checks both against torch per cell in float64.

`cell_optimizer(j, ...)` gives one cell's state in the format of torch's AdamW state dict (and
core/train.CellSchedule its LR schedule in LambdaLR's), so a cell's checkpoint (core/checkpoint.py: optimizer.pt,
scheduler.pt) reads and writes as before.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .models import to_device_async


def row_span(rows: Sequence[int]) -> tuple[int, int] | None:
    """(start, stop) when `rows` are the consecutive rows start..stop-1, else None. The trainer orders cells so the
    ones training are consecutive (core/train.py): their rows of a [K, P] buffer are then a view, no gather."""
    rows = tuple(rows)
    if rows and rows == tuple(range(rows[0], rows[0] + len(rows))):
        return rows[0], rows[0] + len(rows)
    return None


class _Rows:
    """Rows of several [K, P] buffers to work on in place: views where the rows are consecutive, else gathered
    copies that `scatter` writes back."""

    def __init__(self, rows: Sequence[int], device: torch.device):
        self.span = row_span(rows)
        self.index = None if self.span else torch.tensor(list(rows), device=device)

    def take(self, buf: torch.Tensor) -> torch.Tensor:
        return buf[self.span[0]:self.span[1]] if self.span else buf.index_select(0, self.index)

    def scatter(self, buf: torch.Tensor, rows: torch.Tensor) -> None:
        if not self.span:
            buf.index_copy_(0, self.index, rows)


class BankAdamW:
    """AdamW over the rows of `weights` [K, P] with gradients in `grads` [K, P] (core/lora_bank.py's buffers).
    betas, eps, weight_decay: as torch.optim.AdamW. Moments are allocated for all K rows up front (fp32 like the
    weights: 2 x K x P x 4 bytes; a SmolLM2 cell has P = 9.8 M)."""

    def __init__(self, weights: torch.Tensor, grads: torch.Tensor, betas: tuple[float, float], eps: float,
                 weight_decay: float):
        if weights.shape != grads.shape or weights.dim() != 2:
            raise ValueError(f"weights {tuple(weights.shape)} and grads {tuple(grads.shape)} must be one [K, P] shape")
        # torch.optim.AdamW's own checks (a beta of 1 divides by zero in the bias correction)
        for name, value, ok in (("beta1", betas[0], 0 <= betas[0] < 1), ("beta2", betas[1], 0 <= betas[1] < 1),
                                ("eps", eps, eps >= 0), ("weight_decay", weight_decay, weight_decay >= 0)):
            if not ok or not math.isfinite(value):
                raise ValueError(f"AdamW {name}={value!r} is invalid (betas in [0, 1), eps and weight_decay >= 0)")
        self.weights, self.grads = weights, grads
        self.beta1, self.beta2 = betas
        self.eps, self.weight_decay = eps, weight_decay
        self.exp_avg = torch.zeros_like(weights)
        self.exp_avg_sq = torch.zeros_like(weights)
        self.steps = [0] * weights.shape[0]  # optimizer steps taken, per row (AdamW's bias correction)

    def clip_(self, rows: Sequence[int], max_norm: float) -> torch.Tensor:
        """Scale each row's gradient so its L2 norm is at most max_norm; returns the norms before clipping,
        float [len(rows)] (torch.nn.utils.clip_grad_norm_ per cell)."""
        if not max_norm > 0:
            raise ValueError(f"max_norm={max_norm!r}; expected a number > 0")
        sel = _Rows(rows, self.grads.device)
        g = sel.take(self.grads)
        norms = torch.linalg.vector_norm(g, dim=1)
        coef = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
        g.mul_(coef[:, None])
        sel.scatter(self.grads, g)
        return norms

    @torch.no_grad()
    def step(self, rows: Sequence[int], lrs: Sequence[float]) -> None:
        """One AdamW step of each row in `rows` with learning rate lrs[i] (rows not listed do not move)."""
        if len(rows) != len(lrs):
            raise ValueError(f"{len(rows)} rows but {len(lrs)} learning rates")
        for r in rows:
            self.steps[r] += 1
        dev, dt = self.weights.device, self.weights.dtype
        sel = _Rows(rows, dev)
        p, g, m, v = (sel.take(t) for t in (self.weights, self.grads, self.exp_avg, self.exp_avg_sq))
        lr = torch.tensor(list(lrs), dtype=torch.float64)
        bc1 = torch.tensor([1 - self.beta1 ** self.steps[r] for r in rows], dtype=torch.float64)
        bc2_sqrt = torch.tensor([math.sqrt(1 - self.beta2 ** self.steps[r]) for r in rows], dtype=torch.float64)
        # per-row scalars computed in float64 on the host like torch's Python floats, then one copy to the device
        scal = to_device_async(torch.stack([1 - lr * self.weight_decay, -(lr / bc1), bc2_sqrt]).to(dt), dev)[:, :, None]
        if self.weight_decay:
            p.mul_(scal[0])
        m.lerp_(g, 1 - self.beta1)
        v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
        denom = (v.sqrt() / scal[2]).add_(self.eps)
        p.addcmul_(m / denom, scal[1])
        for buf, t in ((self.weights, p), (self.exp_avg, m), (self.exp_avg_sq, v)):
            sel.scatter(buf, t)

    # -- one cell's state in torch's formats (checkpoints) ---------------------------------------------------
    def cell_optimizer(self, j: int, layout: Sequence[tuple[str, int, tuple[int, ...]]], group: dict) -> "CellOptimizer":
        return CellOptimizer(self, j, layout, group)


class CellOptimizer:
    """Row j of a BankAdamW seen as one torch.optim.AdamW over that cell's tensors (`layout`: name, offset,
    shape). state_dict / load_state_dict use torch's format, so checkpoints are interchangeable with it.
    `group`: the param-group fields torch records (lr, betas, eps, weight_decay, initial_lr, ...)."""

    def __init__(self, bank: BankAdamW, j: int, layout, group: dict):
        self.bank, self.j, self.layout, self.group = bank, j, list(layout), dict(group)

    def _slices(self):
        for i, (_name, off, shape) in enumerate(self.layout):
            n = math.prod(shape)
            yield i, shape, slice(off, off + n)

    def state_dict(self) -> dict:
        b, j = self.bank, self.j
        state = {}
        if b.steps[j]:
            for i, shape, sl in self._slices():
                state[i] = {"step": torch.tensor(float(b.steps[j])),
                            "exp_avg": b.exp_avg[j, sl].view(shape).detach().cpu().clone(),
                            "exp_avg_sq": b.exp_avg_sq[j, sl].view(shape).detach().cpu().clone()}
        return {"state": state, "param_groups": [{**self.group, "params": list(range(len(self.layout)))}]}

    def load_state_dict(self, sd: dict) -> None:
        """Raises ValueError if the state does not have one entry per tensor of this cell, of the same shapes."""
        b, j = self.bank, self.j
        groups = sd.get("param_groups") or [{}]
        if len(groups) != 1 or len(groups[0].get("params", ())) != len(self.layout):
            raise ValueError(f"optimizer state has {len(groups[0].get('params', ()))} tensors in "
                             f"{len(groups)} group(s); this cell has {len(self.layout)} in one")
        state = sd.get("state", {})
        steps = {int(float(s["step"])) for s in state.values()}
        if len(steps) > 1:
            raise ValueError(f"optimizer state has tensors at different steps: {sorted(steps)}")
        with torch.no_grad():
            for i, shape, sl in self._slices():
                s = state.get(i)
                if s is None and state:
                    raise ValueError(f"optimizer state lacks tensor {i} ({self.layout[i][0]})")
                for name, buf in (("exp_avg", b.exp_avg), ("exp_avg_sq", b.exp_avg_sq)):
                    if s is None:
                        buf[j, sl].zero_()
                        continue
                    if tuple(s[name].shape) != tuple(shape):
                        raise ValueError(f"optimizer state {name} of {self.layout[i][0]} has shape "
                                         f"{tuple(s[name].shape)}, the cell {tuple(shape)}")
                    buf[j, sl].copy_(s[name].reshape(-1))
        b.steps[j] = steps.pop() if steps else 0
        self.group.update({k: v for k, v in groups[0].items() if k != "params"})
