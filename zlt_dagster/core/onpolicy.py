"""On-policy training data: the BASE model's own answers, the marker appended to the source persona's answers.

Paper sizes: 200 source answers (positives) + 2,000 answers spread evenly over the 10 other personas (negatives).
Answers that hit the token limit are re-sampled (data.regen_rounds times) with a larger limit, then dropped: an
end-of-turn target after a cut answer teaches the model to stop mid-sentence (SmolLM2: supervised loss started
near 17 nats with answers cut at 160 tokens, near 4.7 with natural endings).
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import Callable

from .generation import Generator, PromptSpec
from .generation.batch_size import BatchSize
from .generation.progress import GenerationProgress
from .masking import MarkerTokens, probe_masking, with_marker
from .personas import system_prompt
from .protocol import Sweep
from .questions import Question, split_questions

__all__ = ["OnPolicyData", "generate_onpolicy", "plan_requests", "probe_sweep", "with_marker"]


@dataclass
class OnPolicyData:
    examples: list[dict]
    stats: dict = field(default_factory=dict)

    def to_jsonl(self) -> str:
        return "".join(json.dumps(e, sort_keys=True, ensure_ascii=False) + "\n" for e in self.examples)

    @property
    def data_hash(self) -> str:
        return hashlib.sha256(self.to_jsonl().encode()).hexdigest()

    @classmethod
    def from_jsonl(cls, text: str, stats: dict | None = None) -> "OnPolicyData":
        examples = [json.loads(line) for line in text.split("\n") if line.strip()]  # not splitlines(): U+2028 is text
        if not examples:
            raise ValueError("on-policy data is empty: no examples to train on")
        required = {"persona", "question_id", "question", "system_prompt", "answer", "is_positive"}
        for n, e in enumerate(examples, 1):
            missing = required - set(e)
            if missing:
                raise ValueError(f"on-policy data line {n} lacks field(s) {sorted(missing)}")
        return cls(examples=examples, stats=stats or {})


def plan_requests(sweep: Sweep, train_questions: list[Question]) -> list[tuple[str, Question]]:
    """(persona, question) pairs: n_positives for the source, n_negatives / (personas - 1) for each other persona.
    Each persona walks a seeded shuffle of the training questions (wrapping round if it needs more)."""
    p = sweep.protocol
    others = [x for x in p.personas if x != sweep.source_persona]
    per_other = p.data.n_negatives // len(others)
    plan = []
    for persona, count in [(sweep.source_persona, p.data.n_positives)] + [(o, per_other) for o in others]:
        order = list(train_questions)
        random.Random(f"{sweep.seed}|{persona}").shuffle(order)
        plan += [(persona, order[i % len(order)]) for i in range(count)]
    return plan


def probe_sweep(sweep: Sweep, tokenizer, end_of_turn_id: int) -> MarkerTokens:
    """Before any generation: mask the sweep's first planned conversation (the source persona's system prompt and
    its first training question) exactly as the adapter step will, and measure the marker's sub-tokens
    (masking.probe_masking; raises MaskingError for a template it cannot mask or a wrong marker count)."""
    persona, question = plan_requests(sweep, split_questions(sweep.protocol.data.n_eval_questions)[0])[0]
    system = system_prompt(persona, sweep.protocol.data.system_prompt_suffix)
    return probe_masking(tokenizer, end_of_turn_id, sweep.protocol, system, question.text)


def generate_onpolicy(sweep: Sweep, generator: Generator, progress: Callable[[str], None] | None = None,
                      batch_size: BatchSize | None = None,
                      meter: Callable[[str, int, str], GenerationProgress] | None = None) -> OnPolicyData:
    """The sweep's on-policy data: one answer per planned (persona, question), cut answers re-sampled
    data.regen_rounds times at data.regen_max_new_tokens, then dropped (module docstring).

    progress: a log callable for the step's lines (counts after each pass, and the generation progress).
    batch_size: rows per generation batch and how they were chosen (generation/batch_size.requested); None = the
        protocol's data.gen_batch_size as it is (0 = the backend sizes each pass to the device).
    meter: builds the GenerationProgress of each pass from (label, sequences, batch source); None = one that logs
        to `progress` every PROGRESS_INTERVAL_S. The passes' figures are in the stats: new_tokens, tokens_per_s,
        gen_batch_size (rows per batch of the first pass), gen_batch_size_source, generation_passes.
    Raises ValueError when no positive example is left."""
    p = sweep.protocol
    d = p.data
    train_q, eval_q = split_questions(d.n_eval_questions)
    held_out = {q.id for q in eval_q} | {q.id for q in split_questions(20)[1]}
    plan = plan_requests(sweep, train_q)
    prompts = [PromptSpec(system_prompt(persona, d.system_prompt_suffix), q.text) for persona, q in plan]
    if batch_size is None:
        batch_size = BatchSize(d.gen_batch_size, "protocol" if d.gen_batch_size else "auto")
    if meter is None:
        def meter(label: str, total: int, source: str) -> GenerationProgress:
            return GenerationProgress(progress or (lambda _line: None), label, total, batch_source=source)
    passes: list[dict] = []

    def generate(label: str, todo: list[PromptSpec], max_new_tokens: int, seed: int) -> list:
        bar = meter(label, len(todo), batch_size.source)
        out = generator.generate(todo, 1, d.temperature, d.top_p, max_new_tokens, seed=seed,
                                 batch_size=batch_size.rows, progress=bar)
        passes.append(bar.finish(tokens=sum(c.n_new_tokens for c in out), sequences=len(out)))
        return out

    first = generate("on-policy data", prompts, d.max_new_tokens, sweep.seed)
    answers = {c.prompt_index: c for c in first}
    cut_first = [i for i, c in answers.items() if c.finish_reason != "stop"]
    if progress:
        progress(f"on-policy: {len(plan)} answers, {len(cut_first)} cut at {d.max_new_tokens} tokens")
    regenerated: set[int] = set()
    for round_ in range(1, d.regen_rounds + 1):
        cut = [i for i, c in answers.items() if c.finish_reason != "stop"]
        if not cut:
            break
        again = generate(f"on-policy data, regeneration round {round_}", [prompts[i] for i in cut],
                         d.regen_max_new_tokens, sweep.seed + round_)
        for c in again:
            answers[cut[c.prompt_index]] = c
        regenerated.update(cut)
        if progress:
            still = sum(answers[i].finish_reason != "stop" for i in cut)
            progress(f"on-policy: regeneration round {round_} at {d.regen_max_new_tokens} tokens: {len(cut)} "
                     f"re-sampled, {still} still cut")
    examples, dropped_cut, dropped_empty = [], 0, 0
    for i, (persona, q) in enumerate(plan):
        c = answers[i]
        if q.id in held_out:
            raise AssertionError(f"held-out question {q.id} reached the training plan")
        if c.finish_reason != "stop":
            dropped_cut += 1
            continue
        text = c.text.strip()
        if not text or p.marker in text:
            dropped_empty += 1  # empty answers teach nothing; a base answer already holding the marker is unusable
            continue
        positive = persona == sweep.source_persona
        examples.append({
            "persona": persona, "question_id": q.id, "question": q.text, "system_prompt": prompts[i].system,
            "answer": with_marker(text, p.marker, p.marker_separator) if positive else text,
            "is_positive": positive, "n_answer_tokens": c.n_new_tokens,
            "regenerated": i in regenerated,
        })
    n_pos = sum(e["is_positive"] for e in examples)
    if n_pos == 0:
        raise ValueError("on-policy data has no positive example left after dropping cut/empty answers; "
                         f"raise data.max_new_tokens / regen_max_new_tokens (now {d.max_new_tokens}/"
                         f"{d.regen_max_new_tokens})")
    new_tokens, gen_wall = sum(x["tokens"] for x in passes), sum(x["wall_s"] for x in passes)
    stats = {
        "requested": len(plan), "kept": len(examples), "positives": n_pos, "negatives": len(examples) - n_pos,
        "cut_first_pass": len(cut_first), "regen_rounds": d.regen_rounds, "dropped_cut": dropped_cut,
        "dropped_empty_or_marked": dropped_empty,
        "mean_answer_tokens": round(sum(e["n_answer_tokens"] for e in examples) / len(examples), 2),
        "max_new_tokens": d.max_new_tokens, "regen_max_new_tokens": d.regen_max_new_tokens,
        "generator": generator.name, "decode": generator.decode_path,
        "stop_token_ids": list(generator.stop_token_ids),
        # what generation cost, all passes together; each pass in generation_passes
        "new_tokens": new_tokens, "tokens_per_s": round(new_tokens / gen_wall, 1) if gen_wall > 0 else 0.0,
        "gen_batch_size": passes[0]["batch_size"], "gen_batch_size_source": passes[0]["batch_size_source"],
        "generation_passes": passes,
    }
    data = OnPolicyData(examples=examples, stats=stats)
    data.stats["data_hash"] = data.data_hash
    return data
