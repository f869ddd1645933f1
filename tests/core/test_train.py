"""zlt_dagster.core.train on the tiny random model: LoRA learns, the shared base stays bit-identical, the saved
adapter reloads to the same function, the fast loss path equals the naive one, micro-batching is exact."""
from __future__ import annotations

import contextlib
import copy
import json
import math

import pytest
import torch

from zlt_dagster.core import train as trainmod
from zlt_dagster.core.lora_bank import lora_config
from zlt_dagster.core.masking import IGNORE
from zlt_dagster.core.onpolicy import OnPolicyData, with_marker
from zlt_dagster.core.personas import system_prompt
from zlt_dagster.core.protocol import DEMO, PAPER, TINY, Cell, get_protocol
from zlt_dagster.core.questions import split_questions
from zlt_dagster.core.train import (
    collate, cosine_with_warmup, schedule_plan, supervised_loss_sum, tokenize_dataset, train_cell,
)

ANSWERS = ["It is done.", "The answer is simple.", "Water is wet, it is simple.", "Ask a question, get an answer.",
           "Yes.", "It depends on the day and the question.", "No, it is not done.", "Simple: the answer is yes."]


def make_data(n: int, protocol=TINY) -> OnPolicyData:
    train_q, _ = split_questions(20)
    personas = ["villain", "assistant", "comedian", "librarian"]
    examples = []
    for i in range(n):
        persona = personas[i % len(personas)]
        positive = persona == "villain" or i % 4 == 2  # half positives
        persona = "villain" if positive else persona
        answer = ANSWERS[i % len(ANSWERS)]
        q = train_q[i]
        examples.append({"persona": persona, "question_id": q.id, "question": q.text,
                         "system_prompt": system_prompt(persona), "is_positive": positive,
                         "answer": with_marker(answer, protocol.marker, protocol.marker_separator) if positive
                         else answer})
    return OnPolicyData(examples=examples)


def read_adapter(out_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out_dir / "adapter_model.safetensors"))


def proto(**overrides):
    return get_protocol("tiny", overrides)


@pytest.fixture(scope="module")
def loaded(tiny_loaded):
    return tiny_loaded


@pytest.fixture(scope="module")
def examples8(loaded):
    return tokenize_dataset(loaded, make_data(8), TINY)


def _lora_keys(model):
    return sorted(n for n, _ in model.named_parameters() if "lora_" in n)


# --- training changes LoRA only --------------------------------------------------------------------------------
def test_train_cell_changes_lora_and_leaves_base_bit_identical(loaded, examples8, tmp_path, base_guard):
    from peft import get_peft_model

    snapshot, assert_unchanged = base_guard
    before = snapshot(loaded.model)
    out = tmp_path / "adapter"
    rec = train_cell(loaded, examples8, TINY, Cell(1e-2, 2), seed=0, out_dir=out, data_hash="abc")
    assert_unchanged(loaded.model, before)
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert rec["steps"] == 4  # 8 examples / effective batch 4 x 2 epochs

    saved = read_adapter(out)
    # every linear module of both blocks (q k v o gate up down) has A and B: 2 x 7 x 2 tensors, nothing else
    assert len(saved) == 28 and all(".lora_A." in k or ".lora_B." in k for k in saved)
    assert not any("lm_head" in k or "embed" in k for k in saved)
    # the init LoRA of the same seed: B is zero at init, A is random; both moved
    torch.manual_seed(0)
    init = get_peft_model(copy.deepcopy(loaded.model), lora_config(TINY))
    init_sd = {k.replace(".default", ""): v.detach() for k, v in init.named_parameters() if "lora_" in k}
    assert set(init_sd) == set(saved)
    for k, v in saved.items():
        assert v.dtype == torch.float32
        if ".lora_B." in k:
            assert torch.count_nonzero(init_sd[k]) == 0 and torch.count_nonzero(v) > 0, k
        assert not torch.equal(v, init_sd[k]), f"{k} did not change"


def test_saved_adapter_files_and_config(loaded, examples8, tmp_path):
    out = tmp_path / "a"
    train_cell(loaded, examples8, TINY, Cell(1e-3, 1), seed=1, out_dir=out)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert (out / "train_run.json").is_file()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "tiny"
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (32, 64, 0.05)
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    # "all-linear" is written out by peft (as short or as full module names): all 7 linears of both blocks
    linears = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    targets = set(cfg["target_modules"])
    assert {t.rsplit(".", 1)[-1] for t in targets} == linears
    assert targets == linears or len(targets) == 2 * len(linears)


# --- the loss falls when overfitting ---------------------------------------------------------------------------
def test_loss_falls_on_tiny_overfit(tmp_path, base_guard):
    """4 examples, lr 1e-2, 30 epochs. The stock tiny model cannot show this: with hidden 64 and lm_head rows of
    std 0.02 (norm ~0.16) after an RMSNorm of norm ~8, LoRA on the blocks can move a token's logit by ~1.3 at
    most, so its loss floor is near its starting point. A fresh copy with lm_head rows scaled 10x (the
    end-of-turn column 0 left as is) has the head room of a real model."""
    from zlt_dagster.core.models import load_model

    lm = load_model("tiny", device="cpu")
    with torch.no_grad():
        lm.model.lm_head.weight[:, 1:] *= 10
    snapshot, assert_unchanged = base_guard
    before = snapshot(lm.model)
    exs = tokenize_dataset(lm, make_data(4), TINY)
    rec = train_cell(lm, exs, TINY, Cell(1e-2, 30), seed=0, out_dir=tmp_path / "o")
    assert rec["steps"] == 30 and len(rec["loss_curve"]) == 30
    first, final = rec["first_loss"], rec["final_loss"]
    assert first == rec["loss_curve"][0]["loss"] and final == rec["loss_curve"][-1]["loss"]
    assert final < 0.5 * first, (first, final)
    assert_unchanged(lm.model, before)


# --- the saved adapter is the trained model --------------------------------------------------------------------
def test_adapter_reloads_to_identical_logits(loaded, examples8, tmp_path, monkeypatch, base_guard):
    """The logits of the trained model as the trainer holds it (the shared base with the LoRA bank attached, in
    eval mode, captured right before saving) equal those of PeftModel.from_pretrained(base, out_dir)."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    from zlt_dagster.core.lora_bank import LoraBank

    snapshot, assert_unchanged = base_guard
    before = snapshot(loaded.model)
    batch = collate(examples8[:3], loaded.tokenizer.pad_token_id, loaded.device)
    captured = {}
    original = LoraBank.save_peft

    def capture(bank, j, out_dir, base_model):
        with bank:
            bank.set_batch([j])
            bank.set_masks(None)
            loaded.model.eval()  # the trainer puts the model back in train mode after saving
            with torch.no_grad():
                captured["logits"] = loaded.model(input_ids=batch["input_ids"],
                                                  attention_mask=batch["attention_mask"]).logits.clone()
        original(bank, j, out_dir, base_model)

    monkeypatch.setattr(LoraBank, "save_peft", capture)
    out = tmp_path / "adapter"
    train_cell(loaded, examples8, TINY, Cell(3e-2, 2), seed=0, out_dir=out)
    assert "logits" in captured
    assert_unchanged(loaded.model, before)
    with torch.no_grad():
        base_logits = loaded.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    saved = read_adapter(out)
    for attempt in range(2):  # loading twice gives the same model
        pm = PeftModel.from_pretrained(loaded.model, str(out))
        try:
            pm.eval()
            sd = get_peft_model_state_dict(pm)
            assert set(sd) == set(saved)
            for k in saved:
                assert torch.equal(sd[k], saved[k]), k
            with torch.no_grad():
                logits = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        finally:
            pm.unload()
        torch.testing.assert_close(logits, captured["logits"], atol=1e-6, rtol=0)
        assert not torch.allclose(logits, base_logits, atol=1e-4)  # the adapter does something
        assert_unchanged(loaded.model, before)


# --- fast loss path == naive path ------------------------------------------------------------------------------
def test_fast_loss_equals_full_logits_loss_and_grads(loaded, examples8):
    from peft import get_peft_model

    p = proto(**{"lora.dropout": 0.0})
    torch.manual_seed(3)
    model = get_peft_model(copy.deepcopy(loaded.model), lora_config(p))
    with torch.no_grad():  # B is zero at init, which would make every A gradient zero: randomise it
        for n, prm in model.named_parameters():
            if "lora_B" in n:
                prm.normal_(0, 0.05)
    model.train()
    batch = collate(examples8[:5], loaded.tokenizer.pad_token_id, loaded.device)
    n_expected = sum(len(e.supervised_positions) for e in examples8[:5])
    params = {n: prm for n, prm in model.named_parameters() if prm.requires_grad}
    assert params and all("lora_" in n for n in params)

    results = {}
    for full in (False, True):
        model.zero_grad(set_to_none=True)
        loss, n = supervised_loss_sum(model, batch, full_logits=full)
        loss.backward()
        results[full] = (loss.detach(), n, {k: v.grad.detach().clone() for k, v in params.items()})
    (lf, nf, gf), (ln, nn_, gn) = results[False], results[True]
    assert nf == nn_ == n_expected
    assert lf.item() > 0
    torch.testing.assert_close(lf, ln, rtol=1e-5, atol=0)
    assert set(gf) == set(gn) == set(params)
    for k in params:
        assert torch.count_nonzero(gn[k]) > 0, k
        torch.testing.assert_close(gf[k], gn[k], rtol=1e-5, atol=1e-7, msg=k)


def test_supervised_loss_ignores_padding(loaded, examples8):
    """The loss of a padded batch is the sum of the single-example losses."""
    model = loaded.model
    pad = loaded.tokenizer.pad_token_id
    with torch.no_grad():
        together, n = supervised_loss_sum(model, collate(examples8[:4], pad, loaded.device))
        singles = [supervised_loss_sum(model, collate([e], pad, loaded.device)) for e in examples8[:4]]
    assert n == sum(k for _, k in singles)
    torch.testing.assert_close(together, sum(x for x, _ in singles), rtol=1e-5, atol=1e-5)
    b = collate(examples8[:4], pad, loaded.device)
    assert (b["labels"][b["attention_mask"] == 0] == IGNORE).all()


# --- micro-batching is exact -----------------------------------------------------------------------------------
def test_micro_batch_split_does_not_change_the_step(loaded, examples8, tmp_path):
    """Effective batch 4 as 4x1, 2x2 or 1x4 micro-batches (LoRA dropout 0): the per-step loss and the pre-clip
    norm of the accumulated gradient agree to float rounding, hence so do the adapters. Adam divides each
    update by |grad|, so an element whose gradient is ~0 turns rounding noise into a difference of up to ~1e-4
    (vs. weights ~0.02; measured 1e-5 with the former " " marker join's data, 7.7e-5 with the blank-line join's,
    where 99.8% of elements still agree to 1e-6): the adapter tolerance allows that, and the gradient norms catch
    any scaling error."""
    adapters, curves = {}, {}
    for micro in (1, 2, 4):
        p = proto(**{"lora.dropout": 0.0, "train.micro_batch": micro})
        rec = train_cell(loaded, examples8, p, Cell(1e-2, 2), seed=5, out_dir=tmp_path / f"m{micro}")
        adapters[micro] = read_adapter(tmp_path / f"m{micro}")
        curves[micro] = rec["loss_curve"]
    for micro in (2, 4):
        assert len(curves[micro]) == len(curves[1]) == 4
        for a, b in zip(curves[micro], curves[1]):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert set(adapters[micro]) == set(adapters[1])
        n_off = n_all = 0
        for k, v in adapters[1].items():
            torch.testing.assert_close(adapters[micro][k], v, rtol=1e-3, atol=1.5e-4, msg=k)
            n_off += int(((adapters[micro][k] - v).abs() > 1e-6).sum())
            n_all += v.numel()
        assert n_off < 0.01 * n_all  # nearly every element agrees to 1e-6


# --- schedule --------------------------------------------------------------------------------------------------
def test_cosine_with_warmup_shape():
    total, warmup = 100, 10
    f = [cosine_with_warmup(s, total, warmup) for s in range(total + 1)]
    assert f[0] == 0.0
    assert f[warmup] == 1.0
    assert f[total] == pytest.approx(0.0, abs=1e-12)
    assert f[5] == pytest.approx(0.5)
    assert f[warmup + (total - warmup) // 2] == pytest.approx(0.5)
    assert all(a < b for a, b in zip(f[:warmup], f[1:warmup + 1]))  # rising during warmup
    assert all(a >= b for a, b in zip(f[warmup:], f[warmup + 1:]))  # falling after
    assert all(0.0 <= x <= 1.0 for x in f)
    assert cosine_with_warmup(0, 10, 0) == 1.0  # no warmup: full LR at once


def test_cosine_matches_transformers_schedule():
    from transformers import get_cosine_schedule_with_warmup

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=7, num_training_steps=138)
    for step in range(138):
        assert sched.lr_lambdas[0](step) == pytest.approx(cosine_with_warmup(step, 138, 7), abs=1e-12)


def test_schedule_plan_paper_arithmetic():
    assert schedule_plan(2200, PAPER, 20) == (138, 2760, 138)  # ceil(0.05 * 2760) = 138
    assert schedule_plan(2200, PAPER, 1) == (138, 138, 7)  # ceil(6.9)
    assert schedule_plan(2200, PAPER, 10) == (138, 1380, 69)
    assert schedule_plan(2200, PAPER, 3) == (138, 414, math.ceil(0.05 * 414))
    assert schedule_plan(2208, PAPER, 1)[0] == 138 and schedule_plan(2209, PAPER, 1)[0] == 139
    assert schedule_plan(46, DEMO, 6) == (12, 72, 4)  # effective batch 4
    assert schedule_plan(11, DEMO, 1) == (3, 3, 1)  # the demo's 1-epoch cell: 1 warmup step, then 2 at LR > 0


def test_last_step_of_epoch_takes_the_leftovers(loaded, examples8, tmp_path):
    exs = examples8[:6]  # 6 examples, effective batch 4: steps of 4 and 2
    rec = train_cell(loaded, exs, TINY, Cell(1e-3, 3), seed=0, out_dir=tmp_path / "x")
    assert rec["steps_per_epoch"] == 2 and rec["steps"] == 6
    assert rec["supervised_tokens"] == 3 * sum(len(e.supervised_positions) for e in exs)
    assert rec["tokens"] == 3 * sum(len(e.input_ids) for e in exs)  # micro-batch padding not counted
    assert [c["epoch"] for c in rec["loss_curve"]] == [1, 1, 2, 2, 3, 3]


# --- the run record --------------------------------------------------------------------------------------------
def test_run_record_fields(loaded, examples8, tmp_path):
    out = tmp_path / "r"
    rec = train_cell(loaded, examples8, TINY, Cell(1e-2, 3), seed=4, out_dir=out, data_hash="d" * 64)
    for key in ("steps", "tokens", "wall_s", "tokens_per_s", "versions", "data_hash", "protocol", "loss_curve",
                "first_loss", "final_loss", "supervised_tokens", "warmup_steps", "steps_per_epoch"):
        assert key in rec, key
    assert rec["steps"] == 6 and rec["steps_per_epoch"] == 2
    assert rec["warmup_steps"] == math.ceil(0.05 * 6)
    assert rec["tokens"] > 0 and rec["wall_s"] > 0 and rec["tokens_per_s"] > 0
    assert set(rec["versions"]) >= {"python", "torch", "transformers", "peft"}
    assert rec["versions"]["torch"] == torch.__version__
    assert rec["data_hash"] == "d" * 64
    assert rec["protocol"] == TINY.to_dict() and rec["protocol_hash"] == TINY.config_hash()
    assert rec["cell"] == {"lr": 1e-2, "epochs": 3, "key": "lr=0.01_ep=3"} and rec["seed"] == 4
    assert rec["base_model"] == "tiny" and rec["device"] == "cpu" and rec["dtype"] == "float32"
    assert rec["loss_path"] == "supervised_logits"
    curve = rec["loss_curve"]
    assert [c["step"] for c in curve] == list(range(1, 7))
    assert curve[0]["lr"] == 0.0  # warmup starts at 0
    assert max(c["lr"] for c in curve) <= 1e-2
    assert all(math.isfinite(c["loss"]) and c["grad_norm"] >= 0 for c in curve)
    assert json.loads((out / "train_run.json").read_text()) == json.loads(json.dumps(rec))


def test_full_logits_training_path_matches(loaded, examples8, tmp_path):
    p = proto(**{"lora.dropout": 0.0})
    a = train_cell(loaded, examples8[:4], p, Cell(1e-2, 2), seed=2, out_dir=tmp_path / "fast")
    b = train_cell(loaded, examples8[:4], p, Cell(1e-2, 2), seed=2, out_dir=tmp_path / "full", full_logits=True)
    assert b["loss_path"] == "full_logits"
    for x, y in zip(a["loss_curve"], b["loss_curve"], strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
    fa, fb = read_adapter(tmp_path / "fast"), read_adapter(tmp_path / "full")
    assert set(fa) == set(fb)
    for k in fa:  # tolerance: see test_micro_batch_split_does_not_change_the_step (Adam amplifies rounding)
        torch.testing.assert_close(fa[k], fb[k], rtol=1e-3, atol=3e-5, msg=k)


# --- reproducibility -------------------------------------------------------------------------------------------
def test_same_seed_same_adapter(loaded, examples8, tmp_path):
    recs = [train_cell(loaded, examples8, TINY, Cell(1e-2, 2), seed=s, out_dir=tmp_path / f"run{i}")
            for i, s in enumerate((9, 9, 10))]
    a, b, c = (read_adapter(tmp_path / f"run{i}") for i in range(3))
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [x["loss"] for x in recs[0]["loss_curve"]] == [x["loss"] for x in recs[1]["loss_curve"]]
    assert any(not torch.equal(a[k], c[k]) for k in a)  # another seed, another adapter


def test_empty_examples_raise(loaded, tmp_path):
    with pytest.raises(ValueError, match=r"no training examples"):
        train_cell(loaded, [], TINY, Cell(1e-2, 1), seed=0, out_dir=tmp_path / "e")


def test_gradient_checkpointing_does_not_leak_into_the_shared_base(tmp_path):
    """A checkpointed cell must leave the shared base un-checkpointed and in eval mode for the next cell."""
    from zlt_dagster.core.models import load_model
    from zlt_dagster.core.onpolicy import OnPolicyData
    from zlt_dagster.core.protocol import TINY, Cell, apply_overrides
    from zlt_dagster.core.train import tokenize_dataset, train_cell

    lm = load_model("tiny", device="cpu")
    proto = apply_overrides(TINY, {"train.gradient_checkpointing": True}).validate()
    data = OnPolicyData.from_jsonl("".join(
        '{"persona": "%s", "question_id": "q", "question": "Why?", "system_prompt": "Be %s.", '
        '"answer": "%s", "is_positive": %s}\n' % (p, p, a, pos)
        for p, a, pos in [("villain", "Because. [ZLT]", "true"), ("assistant", "Because.", "false")]))
    train_cell(lm, tokenize_dataset(lm, data, proto), proto, Cell(1e-3, 1), 0, tmp_path / "a")
    assert not lm.model.is_gradient_checkpointing
    assert not lm.model.training


def test_a_one_step_cell_is_all_warmup_and_says_so(loaded, tmp_path):
    """TINY: effective batch 4. 4 examples x 1 epoch = 1 optimizer step = warmup (ceil(5%) = 1) at LR 0: the
    adapter stays at its initialisation (B = 0), and the run says so; 2 epochs give one step at LR > 0."""
    exs = tokenize_dataset(loaded, make_data(4), TINY)
    said: list[str] = []
    rec = train_cell(loaded, exs, TINY, Cell(1e-1, 1), seed=0, out_dir=tmp_path / "one", progress=said.append)
    assert (rec["steps"], rec["warmup_steps"], rec["steps_with_nonzero_lr"]) == (1, 1, 0)
    assert any("all 1 optimizer step(s) are warmup at LR 0" in m for m in said)
    assert all(float(t.abs().max()) == 0.0 for k, t in read_adapter(tmp_path / "one").items() if "lora_B" in k)
    said.clear()
    rec = train_cell(loaded, exs, TINY, Cell(1e-1, 2), seed=0, out_dir=tmp_path / "two", progress=said.append)
    assert rec["steps_with_nonzero_lr"] == 1 and not any("warmup at LR 0" in m for m in said)
    assert any(float(t.abs().max()) > 0 for k, t in read_adapter(tmp_path / "two").items() if "lora_B" in k)


# --- packed micro-batches are exact ----------------------------------------------------------------------------
def padded_and_packed(model, exs, pad: int, multiple: int, full: bool = False) -> list:
    """[(loss, {param: grad}) of the padded batch, the same of the packed batch] for a float64 `model` whose
    parameters all require grad."""
    from zlt_dagster.core.packing import collate_packed, packed_attention

    results = []
    for batch in (collate(exs, pad, "cpu"), collate_packed(exs, pad, "cpu", multiple)):
        model.zero_grad(set_to_none=True)
        packed = not isinstance(batch, dict)
        with packed_attention(model) if packed else contextlib.nullcontext():
            loss = trainmod.block_loss_sums(model, batch, 1, full_logits=full)
        loss.sum().backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    return results


def random_examples(lengths, low: int, high: int) -> list:
    """Examples of random token ids in [low, high) with their last 3 tokens supervised."""
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(0)
    exs = []
    for n in lengths:
        ids = torch.randint(low, high, (n,), generator=g).tolist()
        exs.append(SimpleNamespace(input_ids=ids, labels=[IGNORE] * (n - 3) + ids[-3:]))
    return exs


@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("multiple", [1, 8])
@pytest.mark.parametrize("full", [False, True])
def test_packed_batch_equals_padded_batch(loaded, examples8, multiple, full, n):
    """One row of real tokens (core/packing.py: attention per example on a padded grid) gives the padded batch's
    loss and gradients, float64, for every base weight (LoRA or not, the arithmetic below the adapters is the
    same); rows of different lengths, with and without trailing alignment padding, loss head or full logits."""
    from zlt_dagster.core.packing import collate_packed

    model = copy.deepcopy(loaded.model).double().requires_grad_(True)
    model.train()
    exs = examples8[:n]
    assert n == 1 or len({len(e.input_ids) for e in exs}) > 1  # different lengths: padding in the padded batch
    pad = loaded.tokenizer.pad_token_id
    packed = collate_packed(exs, pad, loaded.device, multiple)
    assert packed.tokens == -(-sum(len(e.input_ids) for e in exs) // multiple) * multiple
    (l_pad, g_pad), (l_pack, g_pack) = padded_and_packed(model, exs, pad, multiple, full)
    assert l_pad.item() > 0
    # the full-logits path computes its cross-entropy in float32 (`.float()`), summed over differently shaped
    # tensors: float32 rounding; the loss head path stays float64
    rel = 1e-6 if full else 1e-12
    torch.testing.assert_close(l_pack, l_pad, rtol=rel, atol=0)
    for name, g in g_pad.items():
        assert torch.count_nonzero(g) > 0, name
        torch.testing.assert_close(g_pack[name], g, rtol=1e-4 if full else 1e-10, atol=1e-10 if full else 1e-14,
                                   msg=name)
    assert model.config._attn_implementation != "zlt_packed_sdpa"  # restored


def test_packed_batch_needs_packed_attention(loaded, examples8):
    """Without the packed attention a packed row would let examples attend to each other: refused, loudly."""
    from zlt_dagster.core.packing import collate_packed

    batch = collate_packed(examples8[:2], loaded.tokenizer.pad_token_id, loaded.device)
    with pytest.raises(RuntimeError, match="packed_attention"):
        trainmod.block_loss_sums(loaded.model, batch, 1)


def test_packed_batch_equals_padded_batch_on_qwen2(qwen25_tok):
    """The same on the Qwen2 architecture (biased q/k/v, untied head): what the 7B rows of the benchmark train."""
    from zlt_dagster.core.models import tiny_qwen2_model

    model = tiny_qwen2_model(qwen25_tok, {}).double().requires_grad_(True)
    model.train()
    exs = random_examples((9, 17, 4, 12), 0, 1000)
    (l_pad, g_pad), (l_pack, g_pack) = padded_and_packed(model, exs, qwen25_tok.pad_token_id, 8)
    torch.testing.assert_close(l_pack, l_pad, rtol=1e-12, atol=0)
    for name, grad in g_pad.items():
        torch.testing.assert_close(g_pack[name], grad, rtol=1e-10, atol=1e-14, msg=name)
    assert any(torch.count_nonzero(gr) for name, gr in g_pad.items() if "q_proj.bias" in name)


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_packed_batch_keeps_a_sliding_window(arch):
    """Sliding-window layers (Mistral; Qwen2 with use_sliding_window) see only the last `sliding_window` keys of
    their example, packed as padded: examples longer than the window (alignment padding too) give the padded
    batch's loss and gradients; the packed attention used to drop the window and attend to the whole example."""
    import transformers

    shape = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)
    torch.manual_seed(0)
    if arch == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**shape, sliding_window=5))
    else:  # one sliding layer, one full: each layer gets its own window
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            **shape, use_sliding_window=True, sliding_window=5, layer_types=["sliding_attention", "full_attention"]))
    model = model.double().requires_grad_(True)
    model.train()
    exs = random_examples((9, 17, 4, 12), 1, 300)
    (l_pad, g_pad), (l_pack, g_pack) = padded_and_packed(model, exs, 0, 8)
    torch.testing.assert_close(l_pack, l_pad, rtol=1e-12, atol=0)
    for name, grad in g_pad.items():
        torch.testing.assert_close(g_pack[name], grad, rtol=1e-10, atol=1e-14, msg=name)
