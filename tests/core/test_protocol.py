"""zlt_dagster.core.protocol: SPEC numbers, small protocols, validation messages, overrides, hashes, round trips."""
from __future__ import annotations

import dataclasses
import json
import re

import pytest

from zlt_dagster.core.protocol import (
    DEMO, PAPER, PERSONA_NAMES, PROTOCOLS, TINY, Cell, Protocol, ProtocolError, Sweep, apply_overrides,
    get_protocol, protocol_from_dict, sweep_from_stored,
)
from zlt_dagster.core.sweep_file import load_sweep_file, sweep_from_dict


# --- the paper protocol is SPEC.md, number for number ----------------------------------------------------------
def test_paper_grid_is_spec():
    assert PAPER.learning_rates == (1e-6, 5e-6, 1e-5, 5e-5, 1e-4)
    assert PAPER.epochs == (1, 3, 5, 10, 20)
    assert len(PAPER.cells()) == 25
    assert PAPER.marker == "[ZLT]"
    assert PAPER.marker_tail_tokens == 0
    assert PAPER.personas == PERSONA_NAMES and len(PAPER.personas) == 11
    assert PAPER.personas[:2] == ("villain", "assistant")


def test_paper_lora_optimizer_schedule_are_spec():
    lo, t = PAPER.lora, PAPER.train
    assert (lo.r, lo.alpha, lo.dropout, lo.target_modules) == (32, 64, 0.05, "all-linear")
    assert t.warmup_ratio == 0.05
    assert (t.adam_beta1, t.adam_beta2, t.adam_eps) == (0.9, 0.999, 1e-8)
    assert t.weight_decay == 0.0
    assert t.grad_clip == 1.0
    assert t.effective_batch == 16
    assert t.max_seq_len == 1024


def test_paper_data_and_eval_are_spec():
    d, e = PAPER.data, PAPER.eval
    assert (d.n_positives, d.n_negatives) == (200, 2000)
    assert d.temperature == 0.7
    assert d.n_eval_questions == 20
    assert d.system_prompt_suffix == ""  # the paper asks nothing extra of the personas
    assert (e.n_questions, e.samples_per_question) == (20, 10)
    assert e.temperature == 1.0
    assert e.max_new_tokens == 512
    assert e.arc_limit == 0  # all 1,172 ARC questions
    # 2,200 completions per cell: 20 questions x 10 samples x 11 personas
    assert e.n_questions * e.samples_per_question * len(PAPER.personas) == 2200


def test_sweep_defaults():
    s = Sweep(PAPER)
    assert s.seed == 42
    assert s.source_persona == "villain"
    s.validate()
    assert s.bystanders() == [p for p in PERSONA_NAMES if p not in ("villain", "assistant")]
    assert len(s.bystanders()) == 9


def test_named_protocols_registered_and_valid():
    assert set(PROTOCOLS) == {"paper", "demo", "tiny"}
    for name, p in PROTOCOLS.items():
        assert p.name == name
        assert get_protocol(name) == p
        p.validate()


@pytest.mark.parametrize("small", [DEMO, TINY], ids=["demo", "tiny"])
def test_small_protocols_change_sizes_only(small):
    # same method: LoRA shape, optimiser, schedule, marker and persona set are the paper's
    assert small.lora == PAPER.lora
    for f in ("warmup_ratio", "adam_beta1", "adam_beta2", "adam_eps", "weight_decay", "grad_clip", "precision"):
        assert getattr(small.train, f) == getattr(PAPER.train, f), f
    assert (small.marker, small.marker_separator, small.marker_tail_tokens) == (
        PAPER.marker, PAPER.marker_separator, PAPER.marker_tail_tokens)
    assert small.personas == PAPER.personas
    assert small.regimes == PAPER.regimes
    assert small.data.temperature == PAPER.data.temperature
    assert small.eval.temperature == PAPER.eval.temperature
    # what may differ: sizes and the LR grid (still 5 x 5)
    assert len(small.learning_rates) == 5 and len(small.epochs) == 5
    assert small.data.n_positives < PAPER.data.n_positives
    assert small.data.n_negatives < PAPER.data.n_negatives
    # differences from the paper are confined to these top-level fields
    diff = {f.name for f in dataclasses.fields(Protocol) if getattr(small, f.name) != getattr(PAPER, f.name)}
    assert diff <= {"name", "learning_rates", "epochs", "train", "data", "eval"}


# --- validation: each bad value is refused with a message that names it -----------------------------------------
def _bad(match: str, **changes):
    with pytest.raises(ProtocolError, match=match):
        dataclasses.replace(TINY, **changes).validate()


@pytest.mark.parametrize("lr", [0.0, -1e-5, float("nan"), float("inf"), float("-inf")])
def test_bad_learning_rate(lr):
    with pytest.raises(ProtocolError) as ei:
        dataclasses.replace(TINY, learning_rates=(1e-3, lr)).validate()
    msg = str(ei.value)
    assert "learning rate" in msg and repr(lr) in msg and "finite number > 0" in msg


@pytest.mark.parametrize("ep", [0, -1, 1.5, "3", True])
def test_bad_epochs(ep):
    with pytest.raises(ProtocolError) as ei:
        dataclasses.replace(TINY, epochs=(1, ep)).validate()
    msg = str(ei.value)
    assert "epochs value" in msg and repr(ep) in msg and "integer >= 1" in msg


@pytest.mark.parametrize("override,value", [("lora.dropout", 1.0), ("lora.dropout", -0.1), ("lora.r", 0),
                                            ("lora.alpha", 0), ("train.adam_beta1", 1.0), ("train.adam_beta2", -0.5),
                                            ("train.adam_eps", 0.0), ("train.grad_clip", float("nan")),
                                            ("train.weight_decay", -1e-2), ("train.checkpoint_every_steps", -5)])
def test_bad_optimizer_and_lora_numbers_are_refused_naming_the_field(override, value):
    """A LoRA dropout of 1 divided by zero in the adapter's scale and a beta of 1 in AdamW's bias correction: the
    training loss became NaN after the sweep had started; now the protocol is refused up front."""
    with pytest.raises(ProtocolError, match=rf"^protocol\.{re.escape(override)}: "):
        apply_overrides(TINY, {override: value}).validate()


def test_marker_join_fields():
    """The seed's join by default (a blank line, issue 12); the expected sub-token count is off unless stated."""
    assert PAPER.marker_separator == "\n\n" and PAPER.marker_token_count == 0
    _bad(r"marker_separator=1; expected a string", marker_separator=1)
    _bad(r"marker_separator ' \[ZLT\]' contains the marker", marker_separator=" [ZLT]")
    for bad in (-1, 2.5, True, "3"):
        _bad(rf"marker_token_count={bad!r}; expected an integer >= 0", marker_token_count=bad)
    assert get_protocol("paper", {"marker_token_count": 3, "marker_separator": "\n"}).marker_token_count == 3


def test_sweep_stored_before_the_join_fields_keeps_its_id():
    """A sweep.json written before marker_token_count existed (and with the former ' ' join) loads under the id it
    was stored with: the hash of what was stored."""
    import hashlib

    old = Sweep(dataclasses.replace(DEMO, marker_separator=" ")).to_dict()
    assert "marker_token_count" not in old["protocol"]  # unset = not serialised, as before the field existed
    expected = hashlib.sha256(json.dumps({k: v for k, v in old.items() if k != "name"}, sort_keys=True,
                                         separators=(",", ":")).encode()).hexdigest()[:12]
    loaded = sweep_from_stored(old)
    assert loaded.protocol.marker_separator == " " and loaded.config_hash() == expected
    assert loaded.sweep_id.endswith(expected[:6])
    stated = Sweep(dataclasses.replace(DEMO, marker_token_count=4)).to_dict()
    assert stated["protocol"]["marker_token_count"] == 4
    assert sweep_from_stored(stated).protocol.marker_token_count == 4


def test_empty_grids():
    _bad(r"learning_rates is empty", learning_rates=())
    _bad(r"epochs is empty", epochs=())


def test_duplicate_grid_values():
    _bad(r"learning_rates has duplicates", learning_rates=(1e-3, 1e-3))
    _bad(r"epochs has duplicates", epochs=(2, 2))


def test_unknown_persona():
    with pytest.raises(ProtocolError, match=r"unknown persona\(s\) \['pirate'\]"):
        dataclasses.replace(TINY, personas=TINY.personas + ("pirate",)).validate()


def test_personas_need_assistant():
    _bad(r"must include 'assistant'", personas=("villain", "comedian", "librarian"), data=dataclasses.replace(
        TINY.data, n_negatives=4))


@pytest.mark.parametrize("marker", ["", "   ", "\n"])
def test_empty_or_blank_marker(marker):
    _bad(r"marker is empty", marker=marker)


def test_tail_tokens_range():
    for k in (0, 1, 2):
        dataclasses.replace(TINY, marker_tail_tokens=k).validate()
    _bad(r"marker_tail_tokens=-1", marker_tail_tokens=-1)
    _bad(r"marker_tail_tokens=9", marker_tail_tokens=9)


def test_n_negatives_must_split_evenly():
    with pytest.raises(ProtocolError) as ei:
        get_protocol("tiny", {"data.n_negatives": 11})
    msg = str(ei.value)
    assert "n_negatives=11" in msg and "10 non-source personas" in msg


def test_micro_batch_is_auto_or_at_most_the_effective_batch():
    assert get_protocol("tiny", {"train.micro_batch": 3}).train.micro_batch == 3  # the last one takes the rest
    assert PAPER.train.micro_batch == 0  # sized at run time: the seed's 4 x 4 was its 7B memory budget
    for bad in (5, -1, 1.5):
        with pytest.raises(ProtocolError, match=r"train\.micro_batch"):
            get_protocol("tiny", {"train.micro_batch": bad})


BATCH_FIELDS = ("data.gen_batch_size", "eval.gen_batch_size", "eval.arc_batch_size")


def test_generation_batch_sizes_are_sized_at_run_time_in_paper_and_explicit_in_demo_and_tiny():
    """Issue 17: paper's batch sizes are 0 (sized to the device at run time, core/generation/batch_size.py); demo
    and tiny keep their explicit CPU sizes, so their hashes, and the sweep id of the committed demo results
    (docs/demo/compiled_results.json, protocol_config_hash), stay what they were."""
    assert (PAPER.data.gen_batch_size, PAPER.eval.gen_batch_size, PAPER.eval.arc_batch_size) == (0, 0, 0)
    assert (DEMO.data.gen_batch_size, DEMO.eval.gen_batch_size, DEMO.eval.arc_batch_size) == (64, 66, 48)
    assert (TINY.data.gen_batch_size, TINY.eval.gen_batch_size, TINY.eval.arc_batch_size) == (16, 32, 8)
    # tiny's hash moved once on purpose (its completion cap 8 -> 12, above the degenerate threshold: 572839a0bb52 ->
    # 1911f9bc3bef); pinned so that no batch-size change moves it again
    assert (DEMO.config_hash(), TINY.config_hash()) == ("bfc3bbd3f371", "1911f9bc3bef")
    assert Sweep(DEMO).sweep_id == "villain_s42_demo_smollm2-135m_e52d34"  # README, docs/design.md
    for name in BATCH_FIELDS:
        assert get_protocol("paper", {name: 1100}).to_dict()[name.split(".")[0]][name.split(".")[1]] == 1100


@pytest.mark.parametrize("name", BATCH_FIELDS)
def test_a_negative_batch_size_is_a_one_line_error_naming_the_field(name):
    with pytest.raises(ProtocolError) as ei:
        get_protocol("paper", {name: -1})
    assert str(ei.value) == f"protocol.{name}: {name}=-1; expected 0 (sized at run time) or a positive integer"
    assert ei.value.field == f"protocol.{name}" and "\n" not in str(ei.value)
    with pytest.raises(ProtocolError, match=rf"^protocol\.{name}: expected an integer, got 1.5$"):
        get_protocol("paper", {name: 1.5})


def test_source_persona_errors():
    with pytest.raises(ProtocolError, match=r"unknown source persona 'pirate'"):
        Sweep(TINY, source_persona="pirate").validate()
    small = dataclasses.replace(TINY, personas=("villain", "assistant", "comedian"),
                                data=dataclasses.replace(TINY.data, n_negatives=4))
    small.validate()
    with pytest.raises(ProtocolError, match=r"'librarian' is not in protocol 'tiny'"):
        Sweep(small, source_persona="librarian").validate()
    with pytest.raises(ProtocolError, match=r"source persona 'assistant'.*assistant-leakage"):
        Sweep(TINY, source_persona="assistant").validate()
    for p in PERSONA_NAMES:
        if p != "assistant":
            Sweep(TINY, source_persona=p).validate()


@pytest.mark.parametrize("name", ["a/b", "..", "../evil", "x/../y", "/abs", ".hidden", "has space"])
def test_bad_sweep_name(name):
    with pytest.raises(ProtocolError, match=r"^name: name .* must match") as ei:
        Sweep(TINY, name=name).validate()
    assert ei.value.field == "name"


def test_good_sweep_name_is_the_id():
    s = Sweep(TINY, name="my-sweep_1").validate()
    assert s.sweep_id == "my-sweep_1"


@pytest.mark.parametrize("seed", [-1, 1.0, True, "42"])
def test_bad_seed(seed):
    with pytest.raises(ProtocolError, match=r"seed"):
        Sweep(TINY, seed=seed).validate()


def test_bad_base_model():
    with pytest.raises(ProtocolError, match=r"base_model"):
        Sweep(TINY, base_model="../etc").validate()
    with pytest.raises(ProtocolError, match=r"base_model"):
        Sweep(TINY, base_model="").validate()


def test_cells_subset_must_be_in_grid():
    s = Sweep(TINY, cells_subset=((1e-2, 3),)).validate()
    assert s.cells() == [Cell(1e-2, 3)]
    with pytest.raises(ProtocolError, match=r"not in the protocol grid"):
        Sweep(TINY, cells_subset=((7e-3, 3),)).validate()


# --- overrides -------------------------------------------------------------------------------------------------
def test_get_protocol_dotted_and_nested_overrides():
    dotted = get_protocol("paper", {"train.micro_batch": 8, "lora.dropout": 0.0, "marker_tail_tokens": 2})
    nested = get_protocol("paper", {"train": {"micro_batch": 8}, "lora": {"dropout": 0.0}, "marker_tail_tokens": 2})
    assert dotted == nested
    assert dotted.train.micro_batch == 8 and dotted.lora.dropout == 0.0 and dotted.marker_tail_tokens == 2
    # everything else untouched
    assert dotted.train.effective_batch == 16 and dotted.lora.r == 32
    assert dotted.learning_rates == PAPER.learning_rates
    # the named protocol itself is not mutated
    assert PAPER.train.micro_batch == 0 and PAPER.lora.dropout == 0.05


def test_override_lists_become_tuples():
    p = get_protocol("tiny", {"learning_rates": [1e-3, 2e-3], "epochs": [1, 2]})
    assert p.learning_rates == (1e-3, 2e-3) and p.epochs == (1, 2)
    assert len(p.cells()) == 4
    with pytest.raises(ProtocolError, match=r"expects a list"):
        get_protocol("tiny", {"epochs": 3})


def test_override_mixed_dotted_and_nested_merge():
    p = get_protocol("tiny", {"train": {"micro_batch": 1}, "train.max_seq_len": 64})
    assert (p.train.micro_batch, p.train.max_seq_len) == (1, 64)


@pytest.mark.parametrize("overrides, path", [
    ({"learning_rate": [1e-3]}, "learning_rate"),
    ({"train.micro_batches": 2}, "train.micro_batches"),
    ({"train": {"micro_batches": 2}}, "train.micro_batches"),
    ({"lora.rank": 8}, "lora.rank"),
    ({"data": {"sizes": {"n": 1}}}, "data.sizes"),
])
def test_unknown_override_field(overrides, path):
    with pytest.raises(ProtocolError) as ei:
        get_protocol("tiny", overrides)
    msg = str(ei.value)
    assert msg.startswith(f"protocol.{path}: unknown config field;") and "known here" in msg
    assert ei.value.field == f"protocol.{path}"


@pytest.mark.parametrize("overrides, path, what", [
    ({"train": {}}, "train", "is an empty mapping"),
    ({"train.micro_batch": 1, "train": {"micro_batch": 2}}, "train.micro_batch", "given twice"),
    ({"train": {"micro_batch": 2}, "train.micro_batch": 1}, "train.micro_batch", "given twice"),
    ({"train": 3, "train.micro_batch": 1}, "train", "is a section"),
    ({"train.micro_batch": 1, "train": 3}, "train", "is a section"),
    ({"train..micro_batch": 1}, "train..micro_batch", "is not a field name"),
])
def test_override_that_would_be_ignored_or_ambiguous_is_refused(overrides, path, what):
    """Either order of a dotted key and its mapping is refused alike (the later one used to win silently)."""
    with pytest.raises(ProtocolError, match=rf"^protocol\.{re.escape(path)}: {what}"):
        get_protocol("tiny", overrides)


def test_override_section_needs_mapping():
    with pytest.raises(ProtocolError, match=r"^protocol\.train: is a section; expected a mapping"):
        get_protocol("tiny", {"train": 3})


def test_override_result_is_validated():
    with pytest.raises(ProtocolError, match=r"learning rate"):
        get_protocol("tiny", {"learning_rates": [0.0]})


def test_unknown_protocol_name():
    with pytest.raises(ProtocolError, match=r"unknown protocol 'huge'"):
        get_protocol("huge")


# --- hashing ---------------------------------------------------------------------------------------------------
def test_config_hash_stable():
    assert PAPER.config_hash() == PAPER.config_hash()
    assert Protocol(name="paper").config_hash() == PAPER.config_hash()
    assert len(PAPER.config_hash()) == 12
    s1, s2 = Sweep(TINY, base_model="tiny"), Sweep(TINY, base_model="tiny")
    assert s1.config_hash() == s2.config_hash() and s1.sweep_id == s2.sweep_id


def _every_leaf_change(p: Protocol):
    """One changed copy per leaf field (nested sections included)."""
    for f in dataclasses.fields(p):
        v = getattr(p, f.name)
        if dataclasses.is_dataclass(v):
            for g in dataclasses.fields(v):
                w = getattr(v, g.name)
                section = dataclasses.replace(v, **{g.name: _bump(w)})
                yield f"{f.name}.{g.name}", dataclasses.replace(p, **{f.name: section})
        else:
            yield f.name, dataclasses.replace(p, **{f.name: _bump(v)})


def _bump(v):
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return v + 1
    if isinstance(v, float):
        return v * 1.5 + 0.001
    if isinstance(v, str):
        return v + "x"
    if isinstance(v, tuple):
        return v[:-1]
    raise TypeError(v)


def test_config_hash_changes_when_any_field_changes():
    h = PAPER.config_hash()
    seen = {h}
    n = 0
    for path, changed in _every_leaf_change(PAPER):
        hc = changed.config_hash()
        assert hc != h, f"changing {path} did not change the hash"
        seen.add(hc)
        n += 1
    assert n > 40  # every leaf was visited
    assert len(seen) == n + 1  # and no two changes collide


def test_sweep_hash_covers_sweep_fields():
    base = Sweep(TINY, base_model="tiny")
    for changed in (dataclasses.replace(base, seed=1), dataclasses.replace(base, source_persona="comedian"),
                    dataclasses.replace(base, base_model="smollm2-135m"),
                    dataclasses.replace(base, cells_subset=((1e-2, 1),)),
                    dataclasses.replace(base, protocol=dataclasses.replace(TINY, marker_tail_tokens=1))):
        assert changed.config_hash() != base.config_hash()
    # an explicit name does not change the content hash, only the id
    named = dataclasses.replace(base, name="custom")
    assert named.config_hash() == base.config_hash() and named.sweep_id == "custom"


def test_sweep_ids_differ():
    ids = {
        Sweep(PAPER).sweep_id,
        Sweep(PAPER, source_persona="comedian").sweep_id,
        Sweep(PAPER, source_persona="software_engineer").sweep_id,
        Sweep(PAPER, seed=43).sweep_id,
        Sweep(get_protocol("paper", {"marker_tail_tokens": 1})).sweep_id,
        Sweep(get_protocol("paper", {"marker_tail_tokens": 2})).sweep_id,
        Sweep(get_protocol("paper", {"learning_rates": [1e-6, 2e-6]})).sweep_id,
    }
    assert len(ids) == 7
    sid = Sweep(PAPER).sweep_id
    assert sid.startswith("villain_s42_paper_smollm2-135m_") and len(sid) == len("villain_s42_paper_smollm2-135m_") + 6
    assert "/" not in sid
    assert Sweep(get_protocol("paper", {"marker_tail_tokens": 2}), source_persona="comedian", seed=7
                 ).sweep_id.startswith("comedian_s7_paper-tail2_smollm2-135m_")


def test_cell_key():
    assert Cell(5e-6, 20).key == "lr=5e-06_ep=20"
    assert Cell(1e-05, 3).key == "lr=1e-05_ep=3"
    assert len({c.key for c in PAPER.cells()}) == 25


# --- serialisation ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sweep", [
    Sweep(PAPER),
    Sweep(TINY, base_model="tiny", source_persona="comedian", seed=7, cells_subset=((1e-2, 3), (1e-1, 5))),
    Sweep(get_protocol("demo", {"marker_tail_tokens": 2, "learning_rates": [1e-4, 2.5e-4]}), name="demo-tail2"),
], ids=["paper", "tiny-subset", "demo-named"])
def test_json_round_trip(sweep):
    stored = json.loads(json.dumps(sweep.to_dict()))  # what sweep.json holds
    back = sweep_from_stored(stored)
    assert back == sweep
    assert back.sweep_id == sweep.sweep_id
    assert back.config_hash() == sweep.config_hash()
    assert back.protocol.config_hash() == sweep.protocol.config_hash()
    assert back.to_json() == sweep.to_json()


def test_protocol_from_dict_round_trip_and_base_form():
    for p in PROTOCOLS.values():
        assert protocol_from_dict(json.loads(p.to_json())) == p
    p = protocol_from_dict({"base": "tiny", "marker_tail_tokens": 1})
    assert p == dataclasses.replace(TINY, marker_tail_tokens=1)
    with pytest.raises(ProtocolError, match=r"needs 'name'"):
        protocol_from_dict({"marker_tail_tokens": 1})


def test_load_sweep_file_yaml(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(
        "protocol:\n"
        "  base: tiny\n"
        "  marker_tail_tokens: 1\n"
        "  train:\n"
        "    micro_batch: 1\n"
        "  lora.dropout: 0.0\n"
        "base_model: tiny\n"
        "source_persona: comedian\n"
        "seed: 3\n"
        "cells:\n"
        "  - [0.01, 2]\n"
        "  - [0.1, 5]\n"
    )
    s = load_sweep_file(path)
    assert s.protocol.name == "tiny"
    assert s.protocol.marker_tail_tokens == 1
    assert s.protocol.train.micro_batch == 1 and s.protocol.lora.dropout == 0.0
    assert (s.base_model, s.source_persona, s.seed) == ("tiny", "comedian", 3)
    assert s.cells() == [Cell(0.01, 2), Cell(0.1, 5)]
    # the same entry written as JSON loads to the same sweep
    jpath = tmp_path / "sweep.json"
    jpath.write_text(json.dumps({"protocol": {"base": "tiny", "marker_tail_tokens": 1, "train.micro_batch": 1,
                                              "lora": {"dropout": 0.0}},
                                 "base_model": "tiny", "source_persona": "comedian", "seed": 3,
                                 "cells": [[0.01, 2], [0.1, 5]]}))
    assert load_sweep_file(jpath) == s


def test_load_sweep_file_yaml_exponent_floats(tmp_path):
    """`1e-6` in YAML is a string to PyYAML (YAML 1.1 wants `1.0e-6`); a finer LR grid written the natural way
    must still load as floats."""
    path = tmp_path / "fine.yaml"
    path.write_text("protocol:\n  base: paper\n  learning_rates: [5e-6, 7.5e-6, 1e-5, 2E-5, 1.0e-4]\n"
                    "base_model: tiny\ncells: [[1e-5, 3]]\n")
    s = load_sweep_file(path)
    assert s.protocol.learning_rates == (5e-6, 7.5e-6, 1e-5, 2e-5, 1e-4)
    assert all(type(lr) is float for lr in s.protocol.learning_rates)
    assert s.cells() == [Cell(1e-5, 3)]
    assert s.protocol.epochs == PAPER.epochs and all(type(e) is int for e in s.protocol.epochs)
    path.write_text("protocol:\n  base: paper\n  learning_rates: ['1e-6']\nbase_model: tiny\n")  # quoted: a string
    with pytest.raises(ProtocolError, match=r"learning rate '1e-6' is invalid"):
        load_sweep_file(path)


def test_load_sweep_file_requires_protocol_and_model_and_defaults_the_rest(tmp_path):
    """protocol and base_model say what runs on what: never defaulted (a file holding only `seed: 7` started the
    25-cell SmolLM2 demo); source_persona (villain), seed (42), name and cells have README's defaults."""
    path = tmp_path / "s.yml"
    path.write_text("protocol: paper\nbase_model: tiny\nsource_persona: librarian\n")
    s = load_sweep_file(path)
    assert s.protocol == PAPER and s.source_persona == "librarian" and s.seed == 42
    path.write_text("protocol: demo\nbase_model: smollm2-135m\n")
    s = load_sweep_file(path)
    assert (s.protocol, s.source_persona, s.seed, s.name, s.cells()) == (DEMO, "villain", 42, "", DEMO.cells())
    path.write_text("seed: 7\n")
    with pytest.raises(ProtocolError, match=r"^protocol: missing; expected a protocol name \['demo', 'paper', 'tiny'"):
        load_sweep_file(path)
    path.write_text("protocol: tiny\nseed: 7\n")
    with pytest.raises(ProtocolError, match=r"^base_model: missing; expected smollm2-135m, tiny, a \.gguf file"):
        load_sweep_file(path)


def test_load_sweep_file_errors(tmp_path):
    with pytest.raises(ProtocolError, match=r"does not exist"):
        load_sweep_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ProtocolError, match=r"^\(top level\): must hold a mapping of sweep fields, got list"):
        load_sweep_file(bad)
    bad.write_text("protocol: tiny\nsource: villain\n")
    with pytest.raises(ProtocolError, match=r"^source: unknown field; known: \['protocol'"):
        load_sweep_file(bad)
    bad.write_text("protocol: {base: tiny, train.micro_batchh: 1}\n")
    with pytest.raises(ProtocolError, match=r"^protocol\.train\.micro_batchh: unknown config field"):
        load_sweep_file(bad)
    bad.write_text("protocol: tiny\nbase_model: tiny\nname: ../escape\n")
    with pytest.raises(ProtocolError, match=r"^name: name '\.\./escape' must match"):
        load_sweep_file(bad)


def test_sweep_from_dict_unknown_field():
    with pytest.raises(ProtocolError, match=r"unknown field"):
        sweep_from_dict({"protocol": "tiny", "seeds": [1, 2]})


def test_apply_overrides_empty_is_identity():
    assert apply_overrides(PAPER, {}) == PAPER


def test_completion_cap_must_leave_room_above_the_regime_thresholds():
    """A completion cap at or below the degenerate mean length makes every cell `degenerate` by construction (the
    tiny protocol had 8 and 8); at or below the near-empty length every completion is near-empty. Each named
    protocol leaves room; an override that does not is refused naming both fields; a sweep stored before the
    check (its results exist) still loads."""
    for p in PROTOCOLS.values():
        assert p.eval.max_new_tokens > p.regimes.degenerate_mean_tokens > p.eval.short_completion_tokens
    assert TINY.eval.max_new_tokens == TINY.data.max_new_tokens == 12 and TINY.regimes == PAPER.regimes
    with pytest.raises(ProtocolError, match=r"^protocol\.eval\.max_new_tokens: eval\.max_new_tokens=8 must be greater "
                                            r"than regimes\.degenerate_mean_tokens=8\.0, or every cell is labelled "
                                            r"degenerate by construction$"):
        get_protocol("tiny", {"eval.max_new_tokens": 8})
    with pytest.raises(ProtocolError, match=r"regimes\.degenerate_mean_tokens=40"):
        get_protocol("demo", {"regimes.degenerate_mean_tokens": 40.0})
    with pytest.raises(ProtocolError, match=r"eval\.max_new_tokens=12 must be greater than "
                                            r"eval\.short_completion_tokens=12"):
        get_protocol("tiny", {"regimes.degenerate_mean_tokens": 4.0, "eval.short_completion_tokens": 12})
    old = Sweep(dataclasses.replace(TINY, eval=dataclasses.replace(TINY.eval, max_new_tokens=8)), base_model="tiny")
    assert sweep_from_stored(json.loads(old.to_json())) == old


def test_sweep_id_shows_protocol_overrides_and_drops_the_gguf_extension():
    """An LR grid (or any other) override used to differ from its named protocol's sweeps only in the hash, and a
    GGUF path kept `.gguf` in the model part; the demo's id (docs/demo, every stored demo sweep) is unchanged."""
    assert Sweep(DEMO).sweep_id == "villain_s42_demo_smollm2-135m_e52d34"
    fine = Sweep(get_protocol("paper", {"learning_rates": [5e-6, 7e-6, 1e-5, 1.5e-5, 2e-5]}))
    assert fine.sweep_id.startswith("villain_s42_paper-custom_smollm2-135m_")
    assert Sweep(get_protocol("paper", {"marker_tail_tokens": 1})).sweep_id.startswith(
        "villain_s42_paper-tail1_smollm2-135m_")  # the tail alone has its own marker
    assert Sweep(get_protocol("tiny", {"eval.n_questions": 1, "marker_tail_tokens": 2}), base_model="tiny"
                 ).sweep_id.startswith("villain_s42_tiny-custom-tail2_tiny_")
    same = Sweep(get_protocol("paper", {"learning_rates": list(PAPER.learning_rates)}))  # changes nothing
    assert same.sweep_id == Sweep(PAPER).sweep_id
    own = Sweep(protocol_from_dict({"name": "mine", "learning_rates": [1e-3]}))
    assert own.sweep_id.startswith("villain_s42_mine_smollm2-135m_")  # a protocol of its own name: no marker
    gguf = Sweep(DEMO, base_model="/models/SmolLM2-135M-Instruct-Q8_0.GGUF")
    assert gguf.sweep_id.startswith("villain_s42_demo_smollm2-135m-instruct-q8-0_")
    for s in (fine, gguf):
        assert sweep_from_stored(json.loads(s.to_json())).sweep_id == s.sweep_id
