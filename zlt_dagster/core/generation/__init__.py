"""Generation backends behind one interface: transformers everywhere, vLLM where it imports."""
from .base import Completion, Generator, PromptSpec, make_generator

__all__ = ["Completion", "Generator", "PromptSpec", "make_generator"]
