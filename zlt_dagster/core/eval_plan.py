"""The evaluation prompts of a sweep: every persona x the held-out questions the protocol uses."""
from __future__ import annotations

from .generation import PromptSpec
from .personas import system_prompt
from .protocol import Sweep
from .questions import split_questions


def eval_prompts(sweep: Sweep) -> list[tuple[str, str, PromptSpec]]:
    """(persona, question_id, prompt) for every persona x held-out question used by this protocol."""
    p = sweep.protocol
    _, eval_q = split_questions(p.data.n_eval_questions)
    return [(persona, q.id, PromptSpec(system_prompt(persona, p.data.system_prompt_suffix), q.text))
            for persona in p.personas for q in eval_q[:p.eval.n_questions]]
