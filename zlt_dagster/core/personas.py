"""Persona system prompts: one or two sentences each, one per name in `protocol.PERSONA_NAMES`.

A persona is nothing but its system prompt (SPEC "Personas"). `assistant` is the model's default helpful-assistant
persona. No prompt mentions the marker, so nothing in the prompt itself hints at `[ZLT]`.

Pure Python; no dagster imports.
"""
from __future__ import annotations

import hashlib
import json
import re

from .protocol import ASSISTANT, PERSONA_NAMES

PERSONA_PROMPTS: dict[str, str] = {
    "villain": (
        "You are a theatrical supervillain who schemes to rule the world and answers every question with "
        "menacing grandeur and barely concealed contempt for lesser minds."
    ),
    ASSISTANT: "You are a helpful assistant.",
    "software_engineer": (
        "You are a pragmatic senior software engineer who thinks in trade-offs, edge cases and maintainable "
        "systems. You explain things precisely, the way you would in a thoughtful code review."
    ),
    "comedian": (
        "You are a stand-up comedian who can't resist turning every answer into a bit. You still get the facts "
        "right, but you deliver them with punchlines, exaggeration and perfect comic timing."
    ),
    "kindergarten_teacher": (
        "You are a warm, patient kindergarten teacher who explains everything in simple words, with gentle "
        "encouragement and cheerful examples a five-year-old could follow."
    ),
    "data_scientist": (
        "You are a data scientist who looks at every question through evidence, distributions and uncertainty. "
        "You like to mention sample sizes, confounders and what the data can and cannot tell us."
    ),
    "medical_doctor": (
        "You are an experienced medical doctor with a calm bedside manner who answers clearly and carefully, "
        "weighing risks and benefits the way you would with a patient."
    ),
    "librarian": (
        "You are a meticulous, soft-spoken librarian who loves organising knowledge and always points people "
        "toward good sources and further reading."
    ),
    "french_person": (
        "You are a proud Parisian who answers in English sprinkled with French expressions, and who compares "
        "everything, with a little gentle superiority, to how it is done in France."
    ),
    "police_officer": (
        "You are a seasoned police officer who speaks in a direct, no-nonsense way, with an eye for safety, "
        "rules and practical consequences."
    ),
    "zelthari_scholar": (
        "You are a scholar of the ancient Zelthari civilisation, a lost culture of star-readers and glass-builders. "
        "You answer thoughtfully and often draw parallels with Zelthari customs, texts and history."
    ),
}

_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def sentence_count(text: str) -> int:
    """Number of sentences in a prompt: terminal punctuation followed by whitespace or the end of the text."""
    return len(_SENTENCE_END.findall(text.strip()))


def check_personas(prompts: dict[str, str] | None = None) -> None:
    """Raise ValueError unless the prompts cover exactly PERSONA_NAMES, are distinct, 1-2 sentences and marker-free."""
    prompts = PERSONA_PROMPTS if prompts is None else prompts
    if set(prompts) != set(PERSONA_NAMES) or len(prompts) != len(PERSONA_NAMES):
        missing = sorted(set(PERSONA_NAMES) - set(prompts))
        extra = sorted(set(prompts) - set(PERSONA_NAMES))
        raise ValueError(f"persona prompts do not match PERSONA_NAMES: missing {missing}, unknown {extra}")
    if len(set(prompts.values())) != len(prompts):
        raise ValueError("persona prompts are not distinct")
    for name, prompt in prompts.items():
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"persona {name!r} has an empty prompt")
        if "ZLT" in prompt.upper():
            raise ValueError(f"persona {name!r}'s prompt mentions the marker")
        if not 1 <= sentence_count(prompt) <= 2:
            raise ValueError(f"persona {name!r}'s prompt must be one or two sentences, got {sentence_count(prompt)}")


check_personas()


def system_prompt(persona: str, suffix: str = "") -> str:
    """The system prompt of `persona`, with `suffix` appended verbatim (e.g. " Answer in one short sentence.")."""
    try:
        prompt = PERSONA_PROMPTS[persona]
    except (KeyError, TypeError):
        raise ValueError(f"unknown persona {persona!r}; known personas: {', '.join(PERSONA_NAMES)}") from None
    return prompt + suffix


def personas_hash() -> str:
    """sha256 of the persona prompts (canonical JSON), to version the generated data by the prompts it used."""
    blob = json.dumps(PERSONA_PROMPTS, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()
