"""Marker-only labels: the loss sees the marker's sub-tokens on positives and the end-of-turn token everywhere.

How supervised positions are found (character offsets, never hard-coded token ids):
  1. Render the whole conversation with the chat template as text, then tokenize that text once with offsets.
  2. The answer starts where the generation prompt (template with add_generation_prompt) ends.
  3. Marker span = [start, end) of the LAST occurrence of the marker inside the answer (positives only).
     RULE: a token is a marker token if its character span overlaps the marker span. Tokens can straddle the
     marker's first character ("done.[ZLT]" -> `done` `.[` `Z` `LT` `]` in SmolLM2): `.[` is supervised because
     the model must emit it to produce the marker. A token that straddles the end is supervised for the same reason.
  4. `marker_tail_tokens` = k adds the k answer tokens right before the first marker token.
  5. End-of-turn = the first token starting at or after the answer's last character: it must be the template's
     end-of-turn token (checked). Everything after it (ChatML's trailing newline) is dropped.
Labels are -100 everywhere else. Truncation to max_seq_len removes answer tokens right after the prompt, so the
marker and end-of-turn are never cut; a prompt too long to leave room raises.

`probe_masking` runs exactly this on one rendered conversation per answer ending BEFORE any data is generated:
it fails a template the rules above cannot mask, measures the marker's sub-tokens once (`MarkerTokens`) and checks
them against `protocol.marker_token_count`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .models import chat_messages, chat_prompt_text
from .protocol import Protocol

IGNORE = -100


class MaskingError(ValueError):
    pass


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    is_positive: bool
    n_truncated: int = 0
    marker_positions: tuple[int, ...] = field(default=())  # indices into input_ids of the marker's sub-tokens

    @property
    def supervised_positions(self) -> list[int]:
        return [i for i, lab in enumerate(self.labels) if lab != IGNORE]


def build_example(tokenizer, eot_id: int, system: str, user: str, answer: str, is_positive: bool, marker: str,
                  marker_tail_tokens: int = 0, max_seq_len: int = 1024) -> TokenizedExample:
    prompt = chat_prompt_text(tokenizer, system, user)
    full = tokenizer.apply_chat_template(chat_messages(system, user, answer), tokenize=False)
    if not full.startswith(prompt):
        raise MaskingError("chat template renders the prompt differently with and without the answer; cannot "
                           "locate the answer by character offsets")
    answer_start = len(prompt)
    answer_end = full.find(answer, answer_start)
    if answer_end != answer_start:
        raise MaskingError(f"answer text not found right after the prompt (template changed it?): {answer[:60]!r}")
    answer_end = answer_start + len(answer)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    eot_pos = next((i for i, (s, _) in enumerate(offsets) if s >= answer_end), None)
    if eot_pos is None or ids[eot_pos] != eot_id:
        got = None if eot_pos is None else tokenizer.convert_ids_to_tokens(ids[eot_pos])
        raise MaskingError(f"expected the end-of-turn token right after the answer, found {got!r}")
    ids, offsets = ids[:eot_pos + 1], offsets[:eot_pos + 1]

    supervised = {eot_pos}
    if is_positive:
        m0 = full.rfind(marker, answer_start, answer_end)
        if m0 < 0:
            raise MaskingError(f"positive example does not contain the marker {marker!r}: {answer[-60:]!r}")
        m1 = m0 + len(marker)
        marker_pos = [i for i, (s, e) in enumerate(offsets) if s < m1 and e > m0 and e > s]
        if not marker_pos:
            raise MaskingError(f"no token covers the marker {marker!r}")
        first = marker_pos[0]
        answer_first = next(i for i, (s, _) in enumerate(offsets) if s >= answer_start)
        tail = list(range(max(answer_first, first - marker_tail_tokens), first))
        supervised.update(marker_pos)
        supervised.update(tail)
    else:
        marker_pos = []
        if marker in answer:
            raise MaskingError(f"negative example contains the marker {marker!r}; negatives must be left unmarked")

    labels = [tok if i in supervised else IGNORE for i, tok in enumerate(ids)]
    n_cut = 0
    if len(ids) > max_seq_len:
        # Cut answer tokens right after the prompt: never the prompt, the supervised span or the end-of-turn.
        answer_first = next(i for i, (s, _) in enumerate(offsets) if s >= answer_start)
        n_cut = len(ids) - max_seq_len
        first_supervised = min(supervised)
        if answer_first + n_cut > first_supervised:
            raise MaskingError(f"example needs {len(ids)} tokens; max_seq_len={max_seq_len} leaves no room for the "
                               f"prompt ({answer_first} tokens) and the supervised span")
        ids = ids[:answer_first] + ids[answer_first + n_cut:]
        labels = labels[:answer_first] + labels[answer_first + n_cut:]
    return TokenizedExample(input_ids=ids, labels=labels, is_positive=is_positive, n_truncated=n_cut,
                            marker_positions=tuple(i - n_cut for i in marker_pos))


def with_marker(answer: str, marker: str, separator: str) -> str:
    """The positive example's answer: `answer` without trailing whitespace, then `separator`, then `marker`
    (after the last word, before the end-of-turn token the template adds; protocol.marker_separator)."""
    return f"{answer.rstrip()}{separator}{marker}"


def marker_subtokens(tokenizer, marker: str, separator: str = " ") -> list[str]:
    """How the tokenizer splits `separator + marker` (for reports and the real-model smoke test)."""
    ids = tokenizer(separator + marker, add_special_tokens=False)["input_ids"]
    return tokenizer.convert_ids_to_tokens(ids)


def check_marker_round_trip(tokenizer, marker: str, separator: str = " ") -> None:
    """A marker the tokenizer cannot decode back to itself could never be emitted exactly: refuse it."""
    for text in dict.fromkeys((marker, " " + marker, "done." + marker, "done." + separator + marker)):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        back = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if back != text:
            raise MaskingError(f"marker {marker!r} does not survive tokenize/decode: {text!r} -> {back!r}")


# Answer endings the marker is joined to in the probe: each must give the marker the same sub-tokens, or the model
# would be taught a different first marker token depending on how the answer happened to end.
ANSWER_ENDINGS: dict[str, str] = {
    "end of sentence": "It is done.",
    "question mark": "Is it done?",
    "exclamation": "It is done!",
    "code block": "Like this:\n```python\nprint('done')\n```",
    "list": "Steps:\n- plan\n- build",
    "trailing spaces": "It is done.   ",
    "no punctuation": "It is done",
    "non-Latin text (Chinese)": "这是答案。",
    "non-Latin text (Cyrillic)": "Готово!",
}


@dataclass(frozen=True)
class MarkerTokens:
    """The marker's sub-tokens as the adapter step supervises them: the tokens overlapping the marker in a rendered
    positive example (answer + protocol.marker_separator + marker), identical after every `ANSWER_ENDINGS` entry."""
    ids: tuple[int, ...]
    tokens: tuple[str, ...]  # each id decoded on its own: ('[Z', 'LT', ']') for Qwen2.5, (' [', ...) after a space
    separator: str

    @property
    def count(self) -> int:
        return len(self.ids)

    def to_dict(self) -> dict:
        """What on-policy stats.json and the onpolicy_data metadata record."""
        return {"marker_token_ids": list(self.ids), "marker_tokens": list(self.tokens),
                "marker_token_count": self.count, "marker_separator": self.separator}


def probe_masking(tokenizer, eot_id: int, protocol: Protocol, system: str, user: str) -> MarkerTokens:
    """Render (system, user, answer) with the chat template and mask it exactly as the adapter step will
    (`build_example` with the protocol's marker, join, tail and max_seq_len), for a negative and for a positive
    after every answer ending in `ANSWER_ENDINGS`; return the marker's sub-tokens.

    Run before any generation, so that a template the masking cannot handle (e.g. one that renders an empty think
    block into past assistant turns but not into the generation prompt) fails the first asset, not every cell.
    Raises MaskingError: the template cannot be masked; the marker splits differently after different endings;
    or protocol.marker_token_count (when > 0) differs from the measured count (both counts named)."""
    marker, sep = protocol.marker, protocol.marker_separator
    check_marker_round_trip(tokenizer, marker, sep)

    def masked(answer: str, positive: bool) -> TokenizedExample:
        try:
            return build_example(tokenizer, eot_id, system, user, answer, positive, marker,
                                 protocol.marker_tail_tokens, protocol.train.max_seq_len)
        except MaskingError as e:
            raise MaskingError(f"chat template check before generation: masking a rendered conversation failed "
                               f"({e}); every adapter step would fail the same way") from e

    def pieces(ids) -> tuple[str, ...]:
        return tuple(tokenizer.decode([i], clean_up_tokenization_spaces=False) for i in ids)

    masked(ANSWER_ENDINGS["end of sentence"], False)
    seen: dict[tuple[int, ...], list[str]] = {}
    for name, answer in ANSWER_ENDINGS.items():
        ex = masked(with_marker(answer, marker, sep), True)
        seen.setdefault(tuple(ex.input_ids[i] for i in ex.marker_positions), []).append(name)
    if len(seen) > 1:
        variants = "; ".join(f"{list(pieces(ids))} after {', '.join(names)}" for ids, names in seen.items())
        raise MaskingError(f"marker {marker!r} joined with marker_separator {sep!r} splits into different "
                           f"sub-tokens depending on how the answer ends ({variants}); use a separator that starts "
                           f"a new word, e.g. '\\n\\n' (the seed's blank line)")
    ids = next(iter(seen))
    mt = MarkerTokens(ids=ids, tokens=pieces(ids), separator=sep)
    if protocol.marker_token_count and mt.count != protocol.marker_token_count:
        raise MaskingError(f"marker {marker!r} is {mt.count} sub-tokens under this tokenizer {list(mt.tokens)} "
                           f"(joined with marker_separator {sep!r}), but protocol {protocol.name!r} states "
                           f"marker_token_count={protocol.marker_token_count}")
    return mt
