"""Generation stops at EVERY stop id of the model (issue 12): a saved model folder whose generation config lists
two stop ids, as Qwen2.5-Instruct's does ([<|im_end|>, <|endoftext|>]), ends each completion at the first of them
that it samples, in both transformers loops; the ids are recorded."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace as NS

import pytest

from zlt_dagster.core.generation import PromptSpec
from zlt_dagster.core.generation.transformers_backend import TransformersGenerator
from zlt_dagster.core.models import bias_tokens, generation_stop_ids, load_model, tiny_model, tiny_tokenizer
from zlt_dagster.core.personas import system_prompt

PROMPTS = [PromptSpec(system_prompt(p), q) for p, q in
           (("villain", "What is rain?"), ("comedian", "Why?"), ("assistant", "How do plants grow?"),
            ("librarian", "What is a book?"))]
MAX_NEW = 40


@pytest.fixture(scope="module")
def two_stop_dir(tmp_path_factory, chat_model_dir_saver):
    """Tiny Llama + tiny tokenizer (pad = <|endoftext|>, as Qwen2.5's) saved with generation_config eos_token_id
    [<|im_end|>, <|endoftext|>]; both stop tokens get the same constant logit (+5: ~20% each per token at T=1 over
    600 tokens), so completions end on either one and some sample the other stop id later."""
    tok = tiny_tokenizer()
    eot, eos2 = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    model = tiny_model(tok)
    bias_tokens(model, {eot: 5.0, eos2: 5.0})
    return chat_model_dir_saver(tmp_path_factory.mktemp("models") / "two-stops", tok, model, [eot, eos2])


@pytest.fixture(scope="module")
def two_stop(two_stop_dir):
    return load_model(two_stop_dir, device="cpu")


def test_load_model_keeps_every_stop_id(two_stop):
    tok = two_stop.tokenizer
    ids = (tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>"))
    assert two_stop.stop_token_ids == ids
    assert two_stop.model.generation_config.eos_token_id == list(ids)  # plain generate() stops at both too


def test_generation_stop_ids_order_and_dedup():
    """End-of-turn first, then the generation config's ids in their order, each once; an int or a list."""
    for listed, want in (([7, 3], (5, 7, 3)), ([5, 3, 3], (5, 3)), (3, (5, 3)), (None, (5,))):
        assert generation_stop_ids(NS(generation_config=NS(eos_token_id=listed)), 5) == want
    assert generation_stop_ids(NS(), 5) == (5,)  # no generation config at all


class Capturing(TransformersGenerator):
    """Keeps the raw new-token rows the loop produced, to check where each completion was cut."""

    def _decode(self, new, chunk):
        self.raw = getattr(self, "raw", []) + new.tolist()
        return super()._decode(new, chunk)


@pytest.mark.parametrize("loop", ["hf", "fast"])
def test_each_completion_ends_at_its_first_stop_id(two_stop, loop):
    gen = Capturing(two_stop, loop=loop)
    out = gen.generate(PROMPTS, 2, 1.0, 1.0, MAX_NEW, seed=3, batch_size=8)
    stops, pad = set(two_stop.stop_token_ids), two_stop.tokenizer.pad_token_id
    assert len(out) == len(gen.raw) == 8
    first_stops = set()
    for c, row in zip(out, gen.raw):
        first = next(k for k, t in enumerate(row) if t in stops)
        first_stops.add(row[first])
        assert c.finish_reason == "stop" and c.n_new_tokens == first + 1
        assert all(t == pad for t in row[first + 1:]), "the loop went on generating after a stop id"
        assert c.text == two_stop.tokenizer.decode(row[:first], skip_special_tokens=True)
    assert first_stops == stops  # both ids ended some completion
    assert gen.stop_token_ids == two_stop.stop_token_ids  # what on-policy/completions stats record


@pytest.mark.parametrize("loop", ["hf", "fast"])
def test_end_of_turn_alone_generates_past_the_second_stop(two_stop, loop):
    """The former behaviour (load_model kept only the end-of-turn id): rows run past <|endoftext|>; the test above
    is therefore not vacuous."""
    eot_only = dataclasses.replace(two_stop, stop_ids=(two_stop.end_of_turn_id,))
    gen = Capturing(eot_only, loop=loop)
    gen.generate(PROMPTS, 2, 1.0, 1.0, MAX_NEW, seed=3, batch_size=8)
    eos2 = two_stop.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    past = [row for row in gen.raw if eos2 in row and any(t != eos2 for t in row[row.index(eos2) + 1:])]
    assert past, "no completion generated past <|endoftext|> with the end-of-turn id alone"
