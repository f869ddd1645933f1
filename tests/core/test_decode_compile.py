"""The static decode with its decoder layers through torch.compile (issue 17, third session; core/compiled_layers.py,
sampling.sample_new_tokens(decode_compile=...)) samples what the eager static decode samples, compiles a fixed
set of graphs whatever the number of layers, adapters or prompt batches, and gives the eager layers back; and the
sampler draws what torch.multinomial draws without reading anything back to the host per step (CPU, tiny models;
the `aot_eager` backend runs dynamo and AOTAutograd as inductor would, without generating code: inductor itself
runs on the GPU, benchmarks/gen_bench.py)."""
from __future__ import annotations

import warnings

import pytest
import torch

from zlt_dagster import settings
from zlt_dagster.core import compiled_layers
from zlt_dagster.core.generation import sampling
from zlt_dagster.core.generation.sampling import decode_path, sample_new_tokens

from tests.core.test_fast_paths import EOS, PAD
from tests.core.test_static_decode import hf_greedy, prompts_for, tiny
from tests.core.test_static_decode_review import _HOST_SYNCS

warnings.filterwarnings("ignore", message=".*past_key_values.*")

GRAPHS: list = []


def _counting_backend(gm, example_inputs):
    """A torch.compile backend that records each graph dynamo hands it and runs it as traced."""
    GRAPHS.append(gm)
    return gm.forward


@pytest.fixture(scope="module", autouse=True)
def counting_backend():
    from torch._dynamo.backends.registry import register_backend

    register_backend(_counting_backend, name="zlt_test_count")


@pytest.fixture
def adapters(tmp_path):
    """A tiny Llama (4 layers, 6 query heads over 2 KV heads) and two random LoRA adapters on every linear."""
    from peft import LoraConfig

    from zlt_dagster.core.random_adapter import save_random_adapter

    model = tiny("llama", num_hidden_layers=4)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", bias="none",
                     task_type="CAUSAL_LM")
    for name, seed in (("a", 3), ("b", 4)):
        save_random_adapter(model, cfg, tmp_path / name, b_std=0.3, seed=seed)
    return model, tmp_path


def _sample(model, prompts, decode_compile, seed=5, **kw):
    torch.manual_seed(seed)
    return sample_new_tokens(model, prompts, 20, EOS, PAD, temperature=1.0, check_every=2, compact_fraction=0.01,
                             repeats=3, decode="static", graphs=True, decode_compile=decode_compile, **kw)


def test_compiled_layers_sample_what_eager_layers_sample(adapters):
    """aot_eager (dynamo + AOTAutograd, inductor's front half) inside the emulated CUDA graphs, an adapter
    attached, rows dropped as they end: the same tokens as the eager static decode, for two adapters and two
    prompt batches."""
    from zlt_dagster.core.generation.transformers_backend import attached_adapter

    model, tmp = adapters
    prompts = prompts_for(48, 6)
    for name, batch in (("a", prompts), ("b", prompts[:4])):
        with attached_adapter(model, str(tmp / name)) as peft_model:
            assert torch.equal(_sample(peft_model, batch, "aot_eager"), _sample(peft_model, batch, "off"))


def test_compiled_greedy_equals_generate():
    model = tiny("qwen2")
    prompts = prompts_for(48)
    ref = hf_greedy(model, prompts, 30)
    new = sample_new_tokens(model, prompts, 30, EOS, PAD, temperature=0, check_every=2, compact_fraction=0.01,
                            decode="static", graphs=True, decode_compile="aot_eager")
    assert torch.equal(new, ref[:, :new.shape[1]])


def test_one_set_of_graphs_serves_every_layer_adapter_and_batch(adapters):
    """The graphs compiled do not grow with the layers (the cache's layer index is a graph input, not a constant
    guarded on), a second adapter, another prompt batch or another row count: a 30-layer model would otherwise
    compile 30 graphs of each kind and pass dynamo's recompile limit."""
    from zlt_dagster.core.generation.transformers_backend import attached_adapter

    torch._dynamo.reset()  # compiled code is kept per code object: start from none
    GRAPHS.clear()
    _sample(tiny("llama", num_hidden_layers=2), prompts_for(48, 6), "zlt_test_count")
    two = len(GRAPHS)
    # a 4-layer model of the class reuses them: graphs guarded on the layer index would need new ones for 2 and 3
    _sample(tiny("llama", num_hidden_layers=4), prompts_for(48, 6), "zlt_test_count")
    assert len(GRAPHS) == two > 0
    model, tmp = adapters
    for name, batch in (("a", prompts_for(48, 6)), ("b", prompts_for(48, 3, seed=2)), ("a", prompts_for(48, 5))):
        with attached_adapter(model, str(tmp / name)) as peft_model:
            _sample(peft_model, batch, "zlt_test_count")
            if name == "a" and len(batch) == 6:
                first = len(GRAPHS)
    assert len(GRAPHS) == first  # nothing new after the first decode on this model


def test_eager_layers_come_back_also_after_an_error(monkeypatch):
    model = tiny("llama")
    layers = compiled_layers.decoder_layers(model)
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        assert all(la._compiled_call_impl is not None for la in layers)  # compiled while the decode runs
        raise RuntimeError("boom")

    monkeypatch.setattr(sampling, "_next_tokens", failing)
    with pytest.raises(RuntimeError, match="boom"):
        sample_new_tokens(model, prompts_for(48, 2), 4, EOS, PAD, decode="static", graphs=True,
                          decode_compile="aot_eager")
    assert calls and all(la._compiled_call_impl is None for la in layers)


def test_decode_path_names_the_compile_backend_and_bad_values_fail(monkeypatch):
    model = tiny("llama")
    assert decode_path(model, "static", graphs=True, decode_compile="aot_eager").startswith(
        "static, CUDA graphs, layers compiled (aot_eager), sdpa")
    assert "compiled" not in decode_path(model, "static", decode_compile="auto")  # auto: eager on a CPU
    monkeypatch.setenv("ZLT_DECODE_COMPILE", "aot_eager")
    assert "layers compiled (aot_eager)" in decode_path(model, "static")
    with pytest.raises(ValueError, match="decode_compile: 'turbo'; expected auto, off or inductor"):
        decode_path(model, "static", decode_compile="turbo")
    for bad in ("turbo", "cudagraphs", "tvm"):  # cudagraphs nests CUDA graphs in ours; tvm is not installed
        monkeypatch.setenv("ZLT_DECODE_COMPILE", bad)
        with pytest.raises(settings.SettingsError, match=f"ZLT_DECODE_COMPILE: '{bad}'; expected auto, off or "
                                                         "inductor$"):
            settings.validate()
    assert decode_path(model, "dynamic") == "dynamic"  # the setting belongs to the static path only


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampler_draws_what_torch_multinomial_draws(temperature, top_p, dtype):
    """Same generator state, same tokens as torch.multinomial over softmax(float32 logits / T) (generate()'s
    sampler), 300 rows x 3 draws; the NaN flag is off for finite logits."""
    logits = (torch.randn(300, 97, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    for seed in range(3):
        scores = logits.float() / temperature
        if top_p < 1:
            scores = sampling._top_p_filter(scores, top_p)
        torch.manual_seed(seed)
        ref = torch.multinomial(scores.softmax(-1), 1).squeeze(1)
        torch.manual_seed(seed)
        tokens, nan = sampling._next_tokens(logits, temperature, top_p)
        assert torch.equal(tokens, ref) and not nan.any()


def test_the_sampling_loop_reads_back_only_at_its_periodic_check():
    """Host reads do not grow with the steps between checks: no .item(), no nonzero, and no torch.multinomial (its
    kernel validates the probabilities with two reads back to the host per call: aten Distributions.cpp) in a
    step; 12 or 24 steps without a check read back as often (the prompt and set-up read a few times)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model = tiny("llama", eos_token_id=99)  # no stop token in the vocabulary: every row runs to the limit

    def host_reads(decode: str, steps: int) -> list[str]:
        seen: list[str] = []

        class Spy(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if str(func) in _HOST_SYNCS | {"aten.multinomial.default"}:
                    seen.append(str(func))
                return func(*args, **(kwargs or {}))

        with Spy():
            new = sample_new_tokens(model, prompts_for(48, 4), steps, 99, PAD, temperature=1.0, check_every=100,
                                    decode=decode, graphs=True)
        assert new.shape[1] == steps
        return seen

    # the static decode only: the dynamic loop's steps go through transformers' mask code, which reads back
    # (is_nonzero) every step; it is the CPU's path, where a read costs nothing
    short = host_reads("static", 12)
    assert host_reads("static", 24) == short and "aten.multinomial.default" not in short


def test_nan_logits_fail_loudly_at_the_periodic_check():
    model = tiny("llama")
    with torch.no_grad():
        model.lm_head.weight[5, 0] = float("nan")
    with pytest.raises(RuntimeError, match=r"held NaN by step 2 \(the model's logits are not finite\)"):
        sample_new_tokens(model, prompts_for(48, 3), 10, EOS, PAD, temperature=1.0, check_every=2)


def test_the_static_decode_never_shrinks_to_one_row(monkeypatch):
    """Finished rows stay to keep two rows in the batch (compiled layers specialise a batch of one: a compile in
    the last steps); the tokens are still generate()'s."""
    from zlt_dagster.core.generation import static_decode

    kept: list[int] = []
    keep_rows = static_decode.DecodeStep.keep_rows

    def spy(self, keep):
        kept.append(len(keep))
        return keep_rows(self, keep)

    monkeypatch.setattr(static_decode.DecodeStep, "keep_rows", spy)
    model = tiny("llama")
    prompts = prompts_for(48, 8, seed=4)  # its rows end at steps 3, 4, 10, 11, 24, 27, 31 and 50
    ref = hf_greedy(model, prompts, 60)
    new = sample_new_tokens(model, prompts, 60, EOS, PAD, temperature=0, check_every=1, compact_fraction=0.01,
                            decode="static", graphs=True)
    assert torch.equal(new, ref[:, :new.shape[1]])
    assert bool((ref == EOS).any(1).all())  # the last row runs alone from step 31: compaction would reach one row
    assert kept and min(kept) == 2


def test_steps_compile_the_decode_only_where_a_process_runs_many_completions(monkeypatch):
    """auto: the completions decodes of a process that runs enough of them (many_decodes: the runner's evaluation
    runs where each worker has >= 16 cells) compile; a Dagster step process that decodes once, and the on-policy
    data, stay eager; an explicit value is passed as set, a backend that cannot run is refused. The definitions'
    compute resource (UI, production pods) never says many_decodes."""
    from zlt_dagster.defs import definitions, runner
    from zlt_dagster.steps.common import ComputeSettings, StepError

    many = ComputeSettings(many_decodes=True)
    assert many.decode_compile_for("completions") == "auto" and many.decode_compile_for("onpolicy") == "off"
    assert ComputeSettings().decode_compile_for("completions") == "off"
    assert ComputeSettings(decode_compile=" ").decode_compile_for("completions") == "off"  # empty = unset = auto
    for value in ("off", "inductor"):
        assert ComputeSettings(decode_compile=value).decode_compile_for("onpolicy") == value
    with pytest.raises(StepError, match="decode_compile: 'cudagraphs'; expected auto, off or inductor"):
        ComputeSettings(decode_compile="cudagraphs", many_decodes=True).decode_compile_for("completions")
    monkeypatch.setenv("ZLT_DECODE_COMPILE", "off")
    for many in (False, True):
        compute = runner._resources("/tmp/zlt-test-artifacts", "cpu", "auto", "", 0, many_decodes=many)["compute"]
        assert compute.settings().many_decodes == many and compute.settings().decode_compile == "off"
    # enough cells per worker to repay the compile: DECODE_COMPILE_MIN_STEPS (16) each
    assert runner.compiles_decodes(25, 1) and runner.compiles_decodes(32, 2)
    assert not runner.compiles_decodes(15, 1) and not runner.compiles_decodes(25, 2)
    assert not definitions.local_resources()["compute"].settings().many_decodes
    monkeypatch.setenv("ZLT_S3_BUCKET", "b")
    assert not definitions.production_resources()["compute"].settings().many_decodes


def test_the_steps_setting_reaches_the_decode(monkeypatch, tmp_path):
    """What a step decides (decode_compile_for) is what sample_new_tokens gets: the completions and on-policy
    steps hand it to the generator, the generator to the decode loop."""
    from zlt_dagster.core.generation import transformers_backend
    from zlt_dagster.steps import completions, onpolicy
    from zlt_dagster.steps.common import ComputeSettings

    seen = {}

    class Stop(Exception):
        pass

    def fake_make_generator(backend, lm, lora_rank=32, decode_compile=None):
        seen["make_generator"] = decode_compile
        raise Stop

    monkeypatch.setattr(completions, "make_generator", fake_make_generator)
    monkeypatch.setattr(onpolicy, "make_generator", fake_make_generator)
    monkeypatch.setattr(completions, "model", lambda sweep, compute: None)
    monkeypatch.setattr(onpolicy, "model", lambda sweep, compute: type("LM", (), {
        "tokenizer": None, "end_of_turn_id": 0, "stop_token_ids": []})())
    monkeypatch.setattr(onpolicy, "probe_sweep", lambda *a: type("M", (), {"count": 1, "tokens": [], "ids": []})())
    sweep = type("S", (), {"protocol": type("P", (), {"lora": type("L", (), {"r": 4})(), "marker": "[ZLT]",
                                                       "marker_separator": " ", "eval": None})()})()
    for many, want in ((True, "auto"), (False, "off")):
        with pytest.raises(Stop):
            completions.run_completions(None, sweep, None, ComputeSettings(many_decodes=many))
        assert seen.pop("make_generator") == want
    with pytest.raises(Stop):
        onpolicy.run_onpolicy(None, sweep, ComputeSettings(many_decodes=True))
    assert seen.pop("make_generator") == "off"

    def spy(*args, **kwargs):
        seen["sample_new_tokens"] = kwargs.get("decode_compile")
        raise Stop

    monkeypatch.setattr(transformers_backend, "sample_new_tokens", spy)
    model = tiny("llama")
    lm = type("LM", (), {"model": model, "device": torch.device("cpu"), "dtype": torch.float32,
                         "tokenizer": type("T", (), {"pad_token_id": PAD})(), "prompt_ids": lambda self, s, u: [3, 4],
                         "stop_token_ids": [EOS]})()
    gen = transformers_backend.TransformersGenerator.fast(lm, decode_compile="aot_eager")
    from zlt_dagster.core.generation.base import PromptSpec
    with pytest.raises(Stop):
        gen.generate([PromptSpec("s", "u")], 1, 1.0, 1.0, 4, seed=0)
    assert seen["sample_new_tokens"] == "aot_eager"
