"""Generation in one folder: the interface (base), the factory, the transformers and vLLM backends, adapter
merging and the decode loop."""
from .base import BACKENDS, Completion, Generator, PromptSpec
from .factory import make_generator, vllm_available

__all__ = ["BACKENDS", "Completion", "Generator", "PromptSpec", "make_generator", "vllm_available"]
