"""core/bank_adamw.py: many cells' AdamW and clipping over one [K, P] buffer compute what torch.optim.AdamW and
torch.nn.utils.clip_grad_norm_ compute per cell (float64), and one cell's state reads and writes torch's format."""
from __future__ import annotations

import pytest
import torch

from zlt_dagster.core.bank_adamw import BankAdamW
from zlt_dagster.core.train import CellSchedule, cosine_with_warmup

# one cell = two tensors (a LoRA A and B of shapes [3, 5] and [4, 3]): P = 27
LAYOUT = [("m.lora_A", 0, (3, 5)), ("m.lora_B", 15, (4, 3))]
P = 27
BETAS, EPS = (0.9, 0.999), 1e-8


def cell_tensors(buf: torch.Tensor, j: int) -> list[torch.Tensor]:
    return [buf[j, off:off + torch.Size(shape).numel()].view(shape) for _, off, shape in LAYOUT]


def group(lr: float, wd: float) -> dict:
    return {"lr": lr, "initial_lr": lr, "betas": BETAS, "eps": EPS, "weight_decay": wd, "amsgrad": False,
            "maximize": False, "foreach": None, "capturable": False, "differentiable": False, "fused": None,
            "decoupled_weight_decay": True}


@pytest.mark.parametrize("rows_per_step", [[[0, 1, 2, 3]] * 4, [[0, 1, 2, 3], [0, 1, 2], [0, 2], [1, 3]]])
def test_rows_step_like_torch_adamw_with_clipping(rows_per_step):
    """Each row with its own LR, weight decay, clipping at a norm some rows exceed; consecutive and gathered
    row sets; rows left out of a step do not move and keep their moments."""
    g = torch.Generator().manual_seed(0)
    k, wd, clip = 4, 0.01, 1.5
    lrs = [1e-1, 3e-2, 1e-3, 5e-1]
    weights = torch.randn(k, P, generator=g, dtype=torch.float64)
    grads = torch.zeros_like(weights)
    bank = BankAdamW(weights, grads, BETAS, EPS, wd)
    ref_params = [[torch.nn.Parameter(t.detach().clone()) for t in cell_tensors(weights, j)] for j in range(k)]
    ref_opts = [torch.optim.AdamW(ps, lr=lrs[j], betas=BETAS, eps=EPS, weight_decay=wd, foreach=False)
                for j, ps in enumerate(ref_params)]
    for step, rows in enumerate(rows_per_step):
        step_grads = torch.randn(k, P, generator=g, dtype=torch.float64) * (0.2 + step)
        grads.copy_(step_grads)
        before = weights.clone()
        norms = bank.clip_(rows, clip)
        scale = [0.5 + 0.1 * step] * len(rows)  # LRs that change per step, as a schedule does
        bank.step(rows, [lrs[r] * s for r, s in zip(rows, scale)])
        for i, r in enumerate(rows):
            for p, gt in zip(ref_params[r], cell_tensors(step_grads, r)):
                p.grad = gt.clone()
            ref_norm = torch.nn.utils.clip_grad_norm_(ref_params[r], clip)
            assert float(norms[i]) == pytest.approx(float(ref_norm), rel=1e-12)
            ref_opts[r].param_groups[0]["lr"] = lrs[r] * scale[i]
            ref_opts[r].step()
        for r in range(k):
            if r not in rows:
                assert torch.equal(weights[r], before[r])
        for r in range(k):
            for ours, ref in zip(cell_tensors(weights, r), ref_params[r]):
                torch.testing.assert_close(ours, ref.detach(), rtol=1e-12, atol=1e-14)
    assert not torch.equal(weights, before)  # the last step moved something


def test_a_cell_state_is_torch_adamw_state_both_ways():
    """A checkpoint written by torch's AdamW resumes in a BankAdamW row and the other way round."""
    g = torch.Generator().manual_seed(1)
    weights = torch.randn(2, P, generator=g, dtype=torch.float64)
    bank = BankAdamW(weights, torch.zeros_like(weights), BETAS, EPS, 0.0)
    cell = bank.cell_optimizer(1, LAYOUT, group(1e-2, 0.0))
    ref_params = [torch.nn.Parameter(t.detach().clone()) for t in cell_tensors(weights, 1)]
    ref = torch.optim.AdamW(ref_params, lr=1e-2, betas=BETAS, eps=EPS, weight_decay=0.0)
    for _ in range(3):  # torch's AdamW runs 3 steps, the bank resumes from its state
        for p in ref_params:
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
        ref.step()
    cell.load_state_dict(ref.state_dict())
    with torch.no_grad():
        for t, p in zip(cell_tensors(weights, 1), ref_params):
            t.copy_(p)
    assert bank.steps[1] == 3
    step_grads = torch.randn(2, P, generator=g, dtype=torch.float64)
    bank.grads.copy_(step_grads)
    bank.step([1], [1e-2])
    for p, gt in zip(ref_params, cell_tensors(step_grads, 1)):
        p.grad = gt.clone()
    ref.step()
    for ours, theirs in zip(cell_tensors(weights, 1), ref_params):
        torch.testing.assert_close(ours, theirs.detach(), rtol=1e-12, atol=1e-14)
    back = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in ref_params], lr=1e-2)
    back.load_state_dict(cell.state_dict())  # torch accepts the bank's state dict
    assert float(back.state_dict()["state"][0]["step"]) == 4
    torch.testing.assert_close(back.state_dict()["state"][1]["exp_avg_sq"], ref.state_dict()["state"][1]["exp_avg_sq"])


def test_a_wrong_state_is_refused_with_the_tensor_named():
    weights = torch.zeros(1, P, dtype=torch.float64)
    cell = BankAdamW(weights, torch.zeros_like(weights), BETAS, EPS, 0.0).cell_optimizer(0, LAYOUT, group(1e-2, 0))
    with pytest.raises(ValueError, match="1 tensors"):
        cell.load_state_dict({"state": {}, "param_groups": [{"params": [0]}]})
    bad = {"state": {i: {"step": torch.tensor(2.0), "exp_avg": torch.zeros(2, 2), "exp_avg_sq": torch.zeros(2, 2)}
                     for i in range(2)}, "param_groups": [{"params": [0, 1]}]}
    with pytest.raises(ValueError, match="m.lora_A"):
        cell.load_state_dict(bad)


def test_rows_and_lrs_must_match():
    weights = torch.zeros(2, P)
    with pytest.raises(ValueError, match="2 rows but 1"):
        BankAdamW(weights, torch.zeros_like(weights), BETAS, EPS, 0.0).step([0, 1], [1e-3])


def test_cell_schedule_is_lambdalr_with_the_cosine_schedule():
    """Same LR as LambdaLR(cosine_with_warmup) at every step, and LambdaLR's state dict both ways."""
    total, warm, base = 12, 3, 2e-4
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=base)
    ref = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_with_warmup(s, total, warm))
    ours = CellSchedule(base, total, warm)
    for step in range(total):
        assert ours.lr(step) == pytest.approx(ref.get_last_lr()[0], rel=1e-15)
        opt.step()
        ref.step()
    ours.load_state_dict(ref.state_dict())
    assert ours.last_epoch == total
    ref.load_state_dict(CellSchedule(base, total, warm).state_dict())
    with pytest.raises(ValueError, match="last_epoch"):
        ours.load_state_dict({})


@pytest.mark.parametrize("betas,eps,wd", [((1.0, 0.999), 1e-8, 0.0), ((0.9, 1.5), 1e-8, 0.0), ((0.9, 0.999), -1.0, 0.0),
                                         ((0.9, 0.999), 1e-8, -0.1)])
def test_bad_hyperparameters_are_refused_like_torch(betas, eps, wd):
    weights = torch.zeros(1, P)
    with pytest.raises(ValueError, match="AdamW .* is invalid"):
        BankAdamW(weights, torch.zeros_like(weights), betas, eps, wd)
    with pytest.raises(ValueError):  # torch's AdamW refuses the same values
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], betas=betas, eps=eps, weight_decay=wd)


def test_clip_needs_a_positive_norm():
    weights = torch.zeros(1, P)
    with pytest.raises(ValueError, match="max_norm"):
        BankAdamW(weights, torch.zeros_like(weights), BETAS, EPS, 0.0).clip_([0], 0.0)
