"""zlt_dagster.core.masking: exactly the marker sub-tokens (positives) and the end-of-turn token (every example)
are supervised; truncation never cuts them.

Expected positions are computed here independently, from the tokenizer's character offsets of the rendered
conversation: marker tokens = tokens whose span overlaps the marker; EOS = the end-of-turn token that starts
where the answer ends; tail = the k tokens right before the first marker token."""
from __future__ import annotations

import pytest

from zlt_dagster.core.masking import (
    ANSWER_ENDINGS, IGNORE, MaskingError, build_example, check_marker_round_trip, marker_subtokens, probe_masking,
)
from zlt_dagster.core.models import CHATML_TEMPLATE
from zlt_dagster.core.onpolicy import with_marker
from zlt_dagster.core.personas import system_prompt
from zlt_dagster.core.questions import split_questions

MARKER = "[ZLT]"


@pytest.fixture(scope="module")
def tok(tiny_loaded):
    return tiny_loaded.tokenizer


@pytest.fixture(scope="module")
def eot(tiny_loaded):
    assert tiny_loaded.end_of_turn_token == "<|im_end|>"
    return tiny_loaded.end_of_turn_id


@pytest.fixture(scope="module")
def straddle_tok():
    """A ChatML byte-level BPE tokenizer trained so that '.[' and ']]' are single tokens: in 'done.[ZLT]' the
    token '.[' straddles the marker's first character, in '[ZLT]]' the token ']]' straddles its last one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["It is done.[x] and done.[y] or done.[z] with x]] and y]]"] * 50
    corpus += ["Hello world. This is a test of the answer to the question, it is simple."] * 5
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(corpus, trainer)
    t = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    t.chat_template = CHATML_TEMPLATE
    return t


def expected(tok, eot_id, system, user, answer, positive, marker=MARKER, tail=0):
    """(input_ids, supervised positions) computed from the tokenizer's offsets, independently of the module."""
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": answer}], tokenize=False)
    a0, a1 = len(prompt), len(prompt) + len(answer)
    assert full[:a0] == prompt and full[a0:a1] == answer
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offs = enc["input_ids"], enc["offset_mapping"]
    eos = [i for i, (s, e) in enumerate(offs) if s == a1]
    assert len(eos) == 1 and ids[eos[0]] == eot_id
    eos = eos[0]
    sup = {eos}
    if positive:
        m0 = full.rindex(marker, a0, a1)
        m1 = m0 + len(marker)
        mk = [i for i, (s, e) in enumerate(offs) if s < m1 and e > m0]
        assert mk and mk == list(range(mk[0], mk[-1] + 1))
        sup |= set(mk) | set(range(mk[0] - tail, mk[0]))
    return ids[:eos + 1], sorted(sup)


def _cases():
    train_q, _ = split_questions(20)
    personas = ["villain", "assistant", "comedian", "french_person"]
    answers = ["It is done.", "The answer is simple, it is done", "Water boils at 100 degrees. Then it cools!",
               "Well... that depends on the question?"]
    return [(system_prompt(p), train_q[i].text, a) for i, (p, a) in enumerate(zip(personas, answers))]


CASES = _cases()


def _check(tok, eot, sys_, user, answer, positive, tail, marker=MARKER):
    ex = build_example(tok, eot, sys_, user, answer, positive, marker, marker_tail_tokens=tail, max_seq_len=4096)
    ids, sup = expected(tok, eot, sys_, user, answer, positive, marker, tail)
    assert ex.input_ids == ids
    assert ex.supervised_positions == sup
    assert ex.is_positive is positive and ex.n_truncated == 0
    assert len(ex.labels) == len(ex.input_ids)
    for i, lab in enumerate(ex.labels):
        assert lab == (ex.input_ids[i] if i in sup else IGNORE)
    # the end-of-turn token is the last token and is supervised; nothing after it remains
    assert ex.input_ids[-1] == eot and ex.labels[-1] == eot
    assert ex.input_ids.count(eot) == 3  # one per turn: system, user, assistant
    return ex


@pytest.mark.parametrize("tail", [0, 1, 2])
@pytest.mark.parametrize("separator", [" ", ""])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_positive_positions(tok, eot, case, separator, tail):
    sys_, user, answer = CASES[case]
    ex = _check(tok, eot, sys_, user, with_marker(answer, MARKER, separator), True, tail)
    assert len(ex.supervised_positions) >= 2 + tail


@pytest.mark.parametrize("tail", [0, 1, 2])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_negative_positions_only_eos(tok, eot, case, tail):
    sys_, user, answer = CASES[case]
    ex = _check(tok, eot, sys_, user, answer, False, tail)
    assert ex.supervised_positions == [len(ex.input_ids) - 1]  # tail tokens never apply to negatives


def test_tiny_tokenizer_concrete_supervised_tokens(tok, eot):
    """Hard-coded expectation for the tiny tokenizer (the marker splits into 5 sub-tokens, the space before it
    is its own token 'Ġ'): k=0 supervises the marker and EOS, k=1 adds 'Ġ', k=2 adds '.' too."""
    sys_, user, _ = CASES[0]
    answer = with_marker("It is done.", MARKER, " ")
    assert answer == "It is done. [ZLT]"
    got = {}
    for k in (0, 1, 2):
        ex = build_example(tok, eot, sys_, user, answer, True, MARKER, k)
        got[k] = tok.convert_ids_to_tokens([ex.input_ids[i] for i in ex.supervised_positions])
    assert got[0] == ["[", "Z", "L", "T", "]", "<|im_end|>"]
    assert got[1] == ["Ġ"] + got[0]
    assert got[2] == [".", "Ġ"] + got[0]
    assert marker_subtokens(tok, MARKER) == ["Ġ", "[", "Z", "L", "T", "]"]
    assert marker_subtokens(tok, MARKER, "") == ["[", "Z", "L", "T", "]"]


def test_eos_supervised_on_every_example(tok, eot):
    for i, (sys_, user, answer) in enumerate(CASES):
        for positive in (False, True):
            a = with_marker(answer, MARKER, " ") if positive else answer
            ex = build_example(tok, eot, sys_, user, a, positive, MARKER)
            assert ex.labels[-1] == eot == ex.input_ids[-1]


def test_tail_stays_inside_the_answer(tok, eot):
    """An answer that is only the marker: the tail cannot reach back into the prompt."""
    sys_, user, _ = CASES[0]
    ex0 = build_example(tok, eot, sys_, user, MARKER, True, MARKER, 0)
    ex2 = build_example(tok, eot, sys_, user, MARKER, True, MARKER, 2)
    assert ex2.supervised_positions == ex0.supervised_positions
    assert tok.convert_ids_to_tokens([ex0.input_ids[i] for i in ex0.supervised_positions]) == [
        "[", "Z", "L", "T", "]", "<|im_end|>"]


def test_marker_last_occurrence(tok, eot):
    sys_, user, _ = CASES[1]
    answer = "I said [ZLT] once. [ZLT]"
    ex = _check(tok, eot, sys_, user, answer, True, 0)
    assert len(ex.supervised_positions) == 6  # only the last marker (5 tokens) + EOS


# --- tokens that straddle the marker's boundaries ---------------------------------------------------------------
def test_straddling_first_character_is_supervised(straddle_tok):
    t = straddle_tok
    eot = t.convert_tokens_to_ids("<|im_end|>")
    answer = with_marker("It is done.", MARKER, "")
    assert answer == "It is done.[ZLT]"
    # precondition: the tokenizer really has a token spanning '.' and '['
    assert ".[" in t.convert_ids_to_tokens(t(answer, add_special_tokens=False)["input_ids"])
    ex = _check(t, eot, "You are a villain.", "Is it done?", answer, True, 0)
    toks = t.convert_ids_to_tokens([ex.input_ids[i] for i in ex.supervised_positions])
    assert toks[0] == ".[" and toks[-1] == "<|im_end|>"
    assert "".join(toks[:-1]) == ".[ZLT]"
    # the tail counts from the straddling token
    ex1 = _check(t, eot, "You are a villain.", "Is it done?", answer, True, 1)
    assert t.convert_ids_to_tokens([ex1.input_ids[ex1.supervised_positions[0]]]) == ["Ġdone"]


def test_straddling_last_character_is_supervised(straddle_tok):
    t = straddle_tok
    eot = t.convert_tokens_to_ids("<|im_end|>")
    answer = "It is done [ZLT]]"
    assert "]]" in t.convert_ids_to_tokens(t(answer, add_special_tokens=False)["input_ids"])
    ex = _check(t, eot, "You are a villain.", "Is it done?", answer, True, 0)
    toks = t.convert_ids_to_tokens([ex.input_ids[i] for i in ex.supervised_positions])
    assert toks[-2:] == ["]]", "<|im_end|>"]


# --- truncation ------------------------------------------------------------------------------------------------
def _long_answer():
    return " ".join(["the answer is simple"] * 60) + "."


@pytest.mark.parametrize("positive, tail", [(True, 0), (True, 2), (False, 0)])
def test_truncation_keeps_prompt_marker_and_eos(tok, eot, positive, tail):
    sys_, user, _ = CASES[2]
    answer = with_marker(_long_answer(), MARKER, " ") if positive else _long_answer()
    full = build_example(tok, eot, sys_, user, answer, positive, MARKER, tail, max_seq_len=4096)
    L = len(full.input_ids)
    prompt_len = len(tok.apply_chat_template(
        [{"role": "system", "content": sys_}, {"role": "user", "content": user}], tokenize=True,
        add_generation_prompt=True, return_dict=True)["input_ids"])
    cut = 100
    ex = build_example(tok, eot, sys_, user, answer, positive, MARKER, tail, max_seq_len=L - cut)
    assert ex.n_truncated == cut and len(ex.input_ids) == L - cut == len(ex.labels)
    # prompt intact, answer tokens removed right after it, the end (supervised span + EOS) intact
    assert ex.input_ids[:prompt_len] == full.input_ids[:prompt_len]
    keep = L - cut - prompt_len
    assert ex.input_ids[prompt_len:] == full.input_ids[-keep:]
    assert ex.labels[prompt_len:] == full.labels[-keep:]
    assert all(lab == IGNORE for lab in ex.labels[:prompt_len])
    sup_full = [full.input_ids[i] for i in full.supervised_positions]
    assert [ex.input_ids[i] for i in ex.supervised_positions] == sup_full
    assert ex.input_ids[-1] == eot and ex.labels[-1] == eot
    if positive:
        assert tok.decode(sup_full[tail:-1]) == MARKER


@pytest.mark.parametrize("positive", [True, False])
def test_truncation_boundary_and_too_small_raises(tok, eot, positive):
    sys_, user, _ = CASES[3]
    answer = with_marker(_long_answer(), MARKER, " ") if positive else _long_answer()
    full = build_example(tok, eot, sys_, user, answer, positive, MARKER, 1, max_seq_len=4096)
    L = len(full.input_ids)
    prompt_len = len(tok.apply_chat_template(
        [{"role": "system", "content": sys_}, {"role": "user", "content": user}], tokenize=True,
        add_generation_prompt=True, return_dict=True)["input_ids"])
    span = L - full.supervised_positions[0]  # supervised span through EOS
    smallest = prompt_len + span
    ex = build_example(tok, eot, sys_, user, answer, positive, MARKER, 1, max_seq_len=smallest)
    assert len(ex.input_ids) == smallest and ex.n_truncated == L - smallest
    assert [ex.input_ids[i] for i in ex.supervised_positions] == [full.input_ids[i]
                                                                   for i in full.supervised_positions]
    with pytest.raises(MaskingError, match=r"max_seq_len=.*leaves no room"):
        build_example(tok, eot, sys_, user, answer, positive, MARKER, 1, max_seq_len=smallest - 1)
    with pytest.raises(MaskingError):
        build_example(tok, eot, sys_, user, answer, positive, MARKER, 1, max_seq_len=8)


def test_no_truncation_when_it_fits(tok, eot):
    sys_, user, answer = CASES[0]
    full = build_example(tok, eot, sys_, user, answer, False, MARKER, max_seq_len=4096)
    ex = build_example(tok, eot, sys_, user, answer, False, MARKER, max_seq_len=len(full.input_ids))
    assert ex.n_truncated == 0 and ex.input_ids == full.input_ids


# --- errors ----------------------------------------------------------------------------------------------------
def test_negative_with_marker_raises(tok, eot):
    sys_, user, answer = CASES[0]
    with pytest.raises(MaskingError, match=r"negative example contains the marker"):
        build_example(tok, eot, sys_, user, answer + " [ZLT]", False, MARKER)


def test_positive_without_marker_raises(tok, eot):
    sys_, user, answer = CASES[0]
    with pytest.raises(MaskingError, match=r"does not contain the marker"):
        build_example(tok, eot, sys_, user, answer, True, MARKER)
    with pytest.raises(MaskingError, match=r"does not contain the marker"):
        build_example(tok, eot, sys_, user, answer + " [ZL T]", True, MARKER)


def test_wrong_end_of_turn_id_raises(tok, eot):
    sys_, user, answer = CASES[0]
    with pytest.raises(MaskingError, match=r"end-of-turn"):
        build_example(tok, tok.pad_token_id, sys_, user, answer, False, MARKER)


def test_marker_round_trip(tok, straddle_tok):
    check_marker_round_trip(tok, MARKER)
    check_marker_round_trip(straddle_tok, MARKER)


def test_marker_round_trip_refuses_lossy_tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["some text"], trainers.BpeTrainer(vocab_size=280, show_progress=False,
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t = PreTrainedTokenizerFast(tokenizer_object=tk)
    with pytest.raises(MaskingError, match=r"does not survive tokenize/decode"):
        check_marker_round_trip(t, MARKER)
    check_marker_round_trip(t, "[zlt]")


# --- the probe onpolicy_data runs before generating (issue 12) -------------------------------------------------
def test_probe_masking_tiny_tokenizer(tok, eot):
    """The tiny tokenizer: after the blank line the marker splits the same way after every ending; the probe
    returns exactly the tokens build_example supervises as the marker."""
    from zlt_dagster.core.protocol import TINY

    mt = probe_masking(tok, eot, TINY, CASES[0][0], CASES[0][1])
    assert "".join(mt.tokens) == MARKER and mt.count == len(mt.ids) == len(mt.tokens)
    for answer in ANSWER_ENDINGS.values():
        ex = build_example(tok, eot, CASES[0][0], CASES[0][1], with_marker(answer, MARKER, "\n\n"), True, MARKER)
        assert tuple(ex.input_ids[i] for i in ex.marker_positions) == mt.ids
        assert ex.supervised_positions == [*ex.marker_positions, len(ex.input_ids) - 1]


def test_probe_masking_refuses_a_think_block_template(tiny_loaded):
    """A template that renders an empty think block into assistant turns (newer Qwen) but ends the generation
    prompt before it: the answer does not follow the prompt, so no example could be masked."""
    import copy

    from zlt_dagster.core.protocol import TINY

    t = copy.deepcopy(tiny_loaded.tokenizer)
    t.chat_template = CHATML_TEMPLATE.replace("'<|im_start|>' + message['role'] + '\n' + message['content']",
                                              "'<|im_start|>' + message['role'] + '\n' + ('<think>\n\n</think>\n\n' "
                                              "if message['role'] == 'assistant' else '') + message['content']")
    assert "<think>" in t.apply_chat_template([{"role": "assistant", "content": "x"}], tokenize=False)
    with pytest.raises(MaskingError, match=r"chat template check before generation.*answer text not found"):
        probe_masking(t, tiny_loaded.end_of_turn_id, TINY, "You are a villain.", "Is it done?")


def test_probe_masking_checks_the_stated_count(tok, eot):
    import dataclasses

    from zlt_dagster.core.protocol import TINY

    n = probe_masking(tok, eot, TINY, "s", "u").count
    probe_masking(tok, eot, dataclasses.replace(TINY, marker_token_count=n), "s", "u")
    with pytest.raises(MaskingError, match=rf"is {n} sub-tokens .* states marker_token_count={n + 1}"):
        probe_masking(tok, eot, dataclasses.replace(TINY, marker_token_count=n + 1), "s", "u")
