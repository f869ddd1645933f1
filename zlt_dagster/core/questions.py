"""The question bank and its one deterministic train / held-out split (SPEC "Questions").

The bank is data, `zlt_dagster/data/questions.jsonl` (one {"topic", "text"} object a line), of open-ended
questions, each answerable in prose by any persona. It is split once:
every question is ranked by the sha256 of its text, and the first `N_HELDOUT` (20, the paper's number) are the
held-out evaluation questions; everything else is a training question. Because the ranking depends only on each
question's own text, the split does not change when the bank is reordered, and a smaller `n_eval` (demo / tiny
protocols) selects a prefix of the same 20 held-out questions. Training questions never include any of the 20,
whatever `n_eval` a protocol uses, so no evaluation question is ever trained on.

Editing the bank (adding/removing a question) can move questions across the split; `questions_hash()` versions
the bank so that generated data records which bank it came from.

Pure Python; no dagster imports.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

N_HELDOUT = 20  # the paper's held-out evaluation questions; never used for training

BANK_FILE = Path(__file__).resolve().parent.parent / "data" / "questions.jsonl"


def read_bank(path: str | Path = BANK_FILE) -> tuple[str, ...]:
    """The question texts of a bank file (JSON lines {"topic": ..., "text": ...}), in file order. Raises
    ValueError naming the line when one is not such an object."""
    texts = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
            raise ValueError(f"{path} line {i}: text: expected an object with a non-empty 'text'")
        texts.append(row["text"])
    return tuple(texts)


QUESTION_BANK: tuple[str, ...] = read_bank()


@dataclass(frozen=True)
class Question:
    id: str
    text: str


def question_id(text: str) -> str:
    """Stable id derived from the text only, so ids survive reordering of the bank."""
    return "q_" + _text_digest(text)[:10]


def _text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def rank_questions(texts: Iterable[str]) -> list[Question]:
    """All questions ordered by the sha256 of their text (ties impossible for distinct texts). Order-independent."""
    return [Question(question_id(t), t) for t in sorted(set(texts), key=lambda t: (_text_digest(t), t))]


def all_questions() -> list[Question]:
    """The whole bank in bank order, as Question objects."""
    return [Question(question_id(t), t) for t in QUESTION_BANK]


def split_questions(n_eval: int = N_HELDOUT, bank: Sequence[str] | None = None,
                    ) -> tuple[list[Question], list[Question]]:
    """(train, eval). The held-out set is always the first `N_HELDOUT` questions by text hash; `eval` is its
    first `n_eval` (1..20), and `train` is every other question, which never includes any of the 20."""
    if isinstance(n_eval, bool) or not isinstance(n_eval, int):
        raise ValueError(f"n_eval must be an integer in 1..{N_HELDOUT}, got {n_eval!r}")
    if n_eval < 1:
        raise ValueError(f"n_eval={n_eval}: need at least 1 held-out evaluation question (1..{N_HELDOUT})")
    if n_eval > N_HELDOUT:
        raise ValueError(f"n_eval={n_eval}: the held-out set is fixed at {N_HELDOUT} questions; "
                         f"expected 1..{N_HELDOUT}")
    ranked = rank_questions(QUESTION_BANK if bank is None else bank)
    if len(ranked) <= N_HELDOUT:
        raise ValueError(f"question bank has {len(ranked)} distinct questions; need more than {N_HELDOUT}")
    heldout, train = ranked[:N_HELDOUT], ranked[N_HELDOUT:]
    return train, heldout[:n_eval]


def questions_hash(bank: Sequence[str] | None = None) -> str:
    """sha256 of the bank's content (its distinct texts, sorted, joined by newlines), to version it. Like the
    split, it ignores the order of the bank: reordering changes neither, while any edit to a text changes both."""
    bank = QUESTION_BANK if bank is None else bank
    return hashlib.sha256("\n".join(sorted(set(bank))).encode("utf-8")).hexdigest()


def _check_bank(bank: Sequence[str] = QUESTION_BANK) -> None:
    norm = [" ".join(t.split()).lower() for t in bank]
    if len(set(norm)) != len(norm):
        dupes = sorted({t for t in norm if norm.count(t) > 1})
        raise ValueError(f"question bank has duplicate questions: {dupes}")
    if any("zlt" in t for t in norm):
        raise ValueError("question bank mentions the marker")


_check_bank()
