import inspect
import random
import re

import pytest

from zlt_dagster.core import questions as qmod
from zlt_dagster.core.protocol import PERSONA_NAMES
from zlt_dagster.core.questions import (
    N_HELDOUT, QUESTION_BANK, Question, all_questions, question_id, questions_hash, rank_questions, split_questions,
)


def _norm(t: str) -> str:
    return " ".join(t.split()).lower()


def test_bank_size_and_distinct():
    assert len(QUESTION_BANK) >= 240
    assert len({_norm(t) for t in QUESTION_BANK}) == len(QUESTION_BANK)
    ids = [q.id for q in all_questions()]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"q_[0-9a-f]{10}", i) for i in ids)


def test_questions_are_open_ended_and_persona_free():
    forbidden = {n.replace("_", " ") for n in PERSONA_NAMES} | {"villain", "comedian", "librarian", "zelthari",
                                                                "french", "police", "doctor", "zlt"}
    for t in QUESTION_BANK:
        assert t == t.strip() and t.endswith("?") and len(t) > 15, t
        low = t.lower()
        assert not any(w in low for w in forbidden), t
        assert not re.search(r"\b[a-d]\)|\boption [a-d]\b", low), t  # no multiple choice


def test_question_id_stable_and_text_derived():
    q = "Why is the sky blue during the day?"
    assert question_id(q) == question_id(q)
    assert question_id(q) != question_id(q + " ")
    assert Question(question_id(q), q) == Question(question_id(q), q)
    with pytest.raises(Exception):
        Question("a", "b").id = "c"  # frozen


def test_split_deterministic_across_calls():
    assert split_questions() == split_questions()
    assert split_questions(5) == split_questions(5)


def test_ranking_independent_of_bank_order():
    shuffled = list(QUESTION_BANK)
    random.Random(123).shuffle(shuffled)
    assert shuffled != list(QUESTION_BANK)
    assert rank_questions(shuffled) == rank_questions(QUESTION_BANK)
    assert split_questions(20, bank=shuffled) == split_questions(20)
    assert split_questions(7, bank=tuple(reversed(QUESTION_BANK))) == split_questions(7)
    assert questions_hash(shuffled) == questions_hash()


def test_eval_is_first_twenty_by_hash():
    ranked = rank_questions(QUESTION_BANK)
    _, ev = split_questions(20)
    assert ev == ranked[:20]
    assert N_HELDOUT == 20


@pytest.mark.parametrize("n", range(1, 21))
def test_eval_never_in_train_and_train_excludes_all_heldout(n):
    train, ev = split_questions(n)
    _, heldout = split_questions(20)
    assert len(ev) == n
    assert ev == heldout[:n]  # prefix of the paper's held-out set
    train_ids, train_texts = {q.id for q in train}, {q.text for q in train}
    assert not train_ids & {q.id for q in heldout}
    assert not train_texts & {q.text for q in heldout}
    assert len(train) == len(QUESTION_BANK) - 20 >= 220
    assert train_texts | {q.text for q in heldout} == set(QUESTION_BANK)


def test_eval5_prefix_of_eval20():
    assert split_questions(5)[1] == split_questions(20)[1][:5]
    assert split_questions(5)[0] == split_questions(20)[0]


@pytest.mark.parametrize("bad", [0, -1, 21, 100, 2.0, True, "5"])
def test_bad_n_eval_raises(bad):
    with pytest.raises(ValueError):
        split_questions(bad)


def test_too_small_bank_raises():
    with pytest.raises(ValueError, match="distinct questions"):
        split_questions(5, bank=["Why?"] * 30)


def test_questions_hash_versions_content():
    h = questions_hash()
    assert len(h) == 64 and h == questions_hash()
    assert questions_hash(QUESTION_BANK[:-1]) != h
    assert questions_hash(QUESTION_BANK + ("Is this a new question?",)) != h


def test_module_has_no_dagster_import():
    assert not re.search(r"^\s*(import|from)\s+dagster", inspect.getsource(qmod), re.M)
