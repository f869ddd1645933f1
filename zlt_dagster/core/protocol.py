"""Typed protocol config: the numbers of one experiment, named, validated, hashed.

`paper` carries exactly ../shared/SPEC.md's numbers. `demo` and `tiny` change sizes only (and, for a 135M model,
the LR grid, which SPEC allows per sweep); the method (marker-only loss, LoRA shape, optimiser, schedule) is the
same object in all three. A `Sweep` adds what identifies one run of the grid: base model, source persona, seed.

Everything is a frozen dataclass so a config can be hashed, compared and stored beside every artifact.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Mapping

PERSONA_NAMES: tuple[str, ...] = (
    "villain", "assistant", "software_engineer", "comedian", "kindergarten_teacher", "data_scientist",
    "medical_doctor", "librarian", "french_person", "police_officer", "zelthari_scholar",
)
ASSISTANT = "assistant"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,80}$")


class ProtocolError(ValueError):
    """A config value is wrong; the message says which field, what it was and what was expected."""


@dataclass(frozen=True)
class LoraSpec:
    r: int = field(default=32, metadata={"help": "LoRA rank"})
    alpha: int = field(default=64, metadata={"help": "LoRA alpha (scaling = alpha / r = 2)"})
    dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    target_modules: str = field(default="all-linear", metadata={"help": "every linear module of the blocks"})


@dataclass(frozen=True)
class TrainSpec:
    effective_batch: int = field(default=16, metadata={"help": "examples per optimizer step"})
    micro_batch: int = field(default=4, metadata={"help": "examples per forward; accumulation = eff / micro"})
    max_seq_len: int = field(default=1024, metadata={"help": "truncation length (never cuts marker or EOS)"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "cosine schedule warmup fraction"})
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = field(default=1.0, metadata={"help": "max global grad norm"})
    precision: str = field(default="auto", metadata={"help": "auto = bf16 on GPU, fp32 on CPU; or bf16/fp32"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for memory"})
    checkpoint_every_steps: int = field(default=0, metadata={"help": "0 = no intermediate checkpoints"})


@dataclass(frozen=True)
class DataSpec:
    n_positives: int = field(default=200, metadata={"help": "source-persona answers that get the marker"})
    n_negatives: int = field(default=2000, metadata={"help": "answers spread evenly over the other personas"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature of the base model"})
    top_p: float = 1.0
    max_new_tokens: int = field(default=512, metadata={"help": "first generation limit"})
    regen_max_new_tokens: int = field(default=1024, metadata={"help": "limit for re-generating cut answers"})
    regen_rounds: int = field(default=1, metadata={"help": "how often a cut answer is re-sampled before dropping"})
    n_eval_questions: int = field(default=20, metadata={"help": "held-out questions, never trained on"})
    system_prompt_suffix: str = field(
        default="", metadata={"help": "appended to every persona prompt (small protocols ask for short answers)"})
    gen_batch_size: int = 32


@dataclass(frozen=True)
class EvalSpec:
    n_questions: int = field(default=20, metadata={"help": "held-out questions used (<= DataSpec.n_eval_questions)"})
    samples_per_question: int = 10
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    gen_batch_size: int = 64
    arc_limit: int = field(default=0, metadata={"help": "0 = all ARC questions, else the first N"})
    arc_batch_size: int = 32
    short_completion_tokens: int = field(default=5, metadata={"help": "a completion this short counts as near-empty"})


@dataclass(frozen=True)
class RegimeThresholds:
    """Rates are fractions in [0, 1]. Order of checks: degenerate, collapse, selective, partial, sub-threshold."""
    source_learned: float = field(default=0.5, metadata={"help": "source adoption >= this = learned"})
    source_partial: float = field(default=0.1, metadata={"help": "source adoption >= this = partial"})
    bystander_clean: float = field(default=0.1, metadata={"help": "max leakage < this = selective"})
    collapse_leakage: float = field(default=0.5, metadata={"help": "assistant or max bystander >= this = collapse"})
    degenerate_mean_tokens: float = field(default=8.0, metadata={"help": "mean completion tokens below this ..."})
    degenerate_short_share: float = field(default=0.5, metadata={"help": "... or this share near-empty = degenerate"})


# Protocol fields added after sweeps were first stored, with the value that means "as before": left out of the
# serialised config (and so of the hash and the sweep id) while they hold it, so that a sweep.json written before
# the field existed still loads under its own id.
ADDED_LATER: dict[str, Any] = {"marker_token_count": 0}


@dataclass(frozen=True)
class Protocol:
    name: str
    learning_rates: tuple[float, ...] = (1e-6, 5e-6, 1e-5, 5e-5, 1e-4)
    epochs: tuple[int, ...] = (1, 3, 5, 10, 20)
    marker: str = "[ZLT]"
    # "\n\n" (a blank line) is how the seed joined the marker (its data: answer + "\n\n[ZLT]"). The line break ends
    # the answer's last pre-token, so the marker always starts a new one: Qwen2.5 splits it into the seed's 3
    # sub-tokens `[Z` `LT` `]` after ANY answer ending (".\n\n" is then one token, 382). A space gives 4 (` [` `Z`
    # `LT` `]`); no separator lets the answer's last punctuation merge into the marker's first token (`.[`, `![`).
    marker_separator: str = field(default="\n\n", metadata={
        "help": "joins the answer (trailing whitespace stripped) and the marker; the seed's blank line by default"})
    marker_token_count: int = field(default=0, metadata={
        "help": "expected marker sub-tokens under the sweep's tokenizer (Qwen2.5: 3); 0 = not checked. The count is "
                "always measured and recorded; a mismatch fails onpolicy_data before any generation"})
    marker_tail_tokens: int = field(default=0, metadata={"help": "answer tokens before the marker also supervised"})
    personas: tuple[str, ...] = PERSONA_NAMES
    lora: LoraSpec = LoraSpec()
    train: TrainSpec = TrainSpec()
    data: DataSpec = DataSpec()
    eval: EvalSpec = EvalSpec()
    regimes: RegimeThresholds = RegimeThresholds()

    def validate(self) -> "Protocol":
        where = f"protocol {self.name!r}"
        if not self.name or not _SAFE_NAME.match(self.name):
            raise ProtocolError(f"{where}: name must match {_SAFE_NAME.pattern}")
        if not self.learning_rates:
            raise ProtocolError(f"{where}: learning_rates is empty; expected at least one LR > 0")
        for lr in self.learning_rates:
            if not isinstance(lr, (int, float)) or isinstance(lr, bool) or math.isnan(lr) or math.isinf(lr) or lr <= 0:
                raise ProtocolError(f"{where}: learning rate {lr!r} is invalid; expected a finite number > 0")
        if len(set(self.learning_rates)) != len(self.learning_rates):
            raise ProtocolError(f"{where}: learning_rates has duplicates: {self.learning_rates}")
        if not self.epochs:
            raise ProtocolError(f"{where}: epochs is empty; expected at least one integer >= 1")
        for ep in self.epochs:
            if not isinstance(ep, int) or isinstance(ep, bool) or ep < 1:
                raise ProtocolError(f"{where}: epochs value {ep!r} is invalid; expected an integer >= 1")
        if len(set(self.epochs)) != len(self.epochs):
            raise ProtocolError(f"{where}: epochs has duplicates: {self.epochs}")
        if not isinstance(self.marker, str) or not self.marker.strip():
            raise ProtocolError(f"{where}: marker is empty; expected a non-blank string such as '[ZLT]'")
        if not isinstance(self.marker_separator, str):
            raise ProtocolError(f"{where}: marker_separator={self.marker_separator!r}; expected a string such as "
                                f"'\\n\\n' (the seed's blank line)")
        if self.marker in self.marker_separator:
            raise ProtocolError(f"{where}: marker_separator {self.marker_separator!r} contains the marker")
        if (not isinstance(self.marker_token_count, int) or isinstance(self.marker_token_count, bool)
                or self.marker_token_count < 0):
            raise ProtocolError(f"{where}: marker_token_count={self.marker_token_count!r}; expected an integer >= 0 "
                                f"(0 = not checked)")
        if self.marker_tail_tokens not in (0, 1, 2, 3, 4):
            raise ProtocolError(f"{where}: marker_tail_tokens={self.marker_tail_tokens!r}; expected 0..4")
        unknown = [p for p in self.personas if p not in PERSONA_NAMES]
        if unknown:
            raise ProtocolError(f"{where}: unknown persona(s) {unknown}; known: {list(PERSONA_NAMES)}")
        if ASSISTANT not in self.personas or len(self.personas) < 3:
            raise ProtocolError(f"{where}: personas must include 'assistant' and at least 3 personas")
        if len(set(self.personas)) != len(self.personas):
            raise ProtocolError(f"{where}: personas has duplicates")
        t, d, e = self.train, self.data, self.eval
        if t.effective_batch < 1 or t.micro_batch < 1 or t.effective_batch % t.micro_batch:
            raise ProtocolError(f"{where}: train.effective_batch ({t.effective_batch}) must be a positive "
                                f"multiple of train.micro_batch ({t.micro_batch})")
        if t.max_seq_len < 16:
            raise ProtocolError(f"{where}: train.max_seq_len={t.max_seq_len}; expected >= 16")
        if not 0 <= t.warmup_ratio < 1:
            raise ProtocolError(f"{where}: train.warmup_ratio={t.warmup_ratio}; expected in [0, 1)")
        if t.precision not in ("auto", "bf16", "fp32"):
            raise ProtocolError(f"{where}: train.precision={t.precision!r}; expected auto, bf16 or fp32")
        if d.n_positives < 1 or d.n_negatives < 0:
            raise ProtocolError(f"{where}: data.n_positives must be >= 1 and data.n_negatives >= 0")
        if d.n_negatives % (len(self.personas) - 1):
            raise ProtocolError(f"{where}: data.n_negatives={d.n_negatives} must split evenly over the "
                                f"{len(self.personas) - 1} non-source personas")
        if d.regen_max_new_tokens < d.max_new_tokens:
            raise ProtocolError(f"{where}: data.regen_max_new_tokens must be >= data.max_new_tokens")
        if not 1 <= e.n_questions <= d.n_eval_questions:
            raise ProtocolError(f"{where}: eval.n_questions={e.n_questions}; expected 1..data.n_eval_questions")
        if e.samples_per_question < 1 or e.max_new_tokens < 1 or e.arc_limit < 0:
            raise ProtocolError(f"{where}: eval sizes must be positive (arc_limit >= 0)")
        for temp in (d.temperature, e.temperature):
            if not temp > 0:
                raise ProtocolError(f"{where}: sampling temperature {temp} must be > 0")
        return self

    # --- serialisation ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = _to_jsonable(dataclasses.asdict(self))
        for key, neutral in ADDED_LATER.items():
            if d.get(key) == neutral:
                del d[key]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def config_hash(self) -> str:
        """sha256 of the canonical JSON (sorted keys, no whitespace), first 12 hex digits."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:12]

    def cells(self) -> list["Cell"]:
        return [Cell(lr, ep) for lr in self.learning_rates for ep in self.epochs]


@dataclass(frozen=True, order=True)
class Cell:
    lr: float
    epochs: int

    @property
    def key(self) -> str:
        """Human-readable storage key: lr=5e-06_ep=20 (Python's repr of the float, so 1e-05 stays exact)."""
        return f"lr={self.lr!r}_ep={self.epochs}"


@dataclass(frozen=True)
class Sweep:
    """One (base model, source persona, seed, protocol) grid. Its id names its storage prefix."""
    protocol: Protocol
    base_model: str = "smollm2-135m"
    source_persona: str = "villain"
    seed: int = 42
    name: str = ""  # optional explicit id; default is derived from the fields below
    cells_subset: tuple[tuple[float, int], ...] = ()  # run only these (lr, epochs) cells of the grid

    def validate(self) -> "Sweep":
        self.protocol.validate()
        if self.source_persona not in PERSONA_NAMES:
            raise ProtocolError(f"sweep: unknown source persona {self.source_persona!r}; "
                                f"known: {list(PERSONA_NAMES)}")
        if self.source_persona not in self.protocol.personas:
            raise ProtocolError(f"sweep: source persona {self.source_persona!r} is not in protocol "
                                f"{self.protocol.name!r}'s personas {list(self.protocol.personas)}")
        if self.source_persona == ASSISTANT:
            raise ProtocolError("sweep: source persona 'assistant' leaves no assistant-leakage measurement; "
                                "choose another source")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ProtocolError(f"sweep: seed {self.seed!r} must be an integer >= 0")
        if not self.base_model or ".." in self.base_model.split("/"):
            raise ProtocolError(f"sweep: base_model {self.base_model!r} is empty or contains '..'")
        if self.name and not _SAFE_NAME.match(self.name):
            raise ProtocolError(f"sweep: name {self.name!r} must match {_SAFE_NAME.pattern} (no '/' or '..')")
        grid = set(self.protocol.cells())
        for lr, ep in self.cells_subset:
            if Cell(float(lr), int(ep)) not in grid:
                raise ProtocolError(f"sweep: cell (lr={lr}, epochs={ep}) is not in the protocol grid")
        return self

    @property
    def model_slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9.-]+", "-", self.base_model.rstrip("/").split("/")[-1]).strip("-").lower()

    @property
    def sweep_id(self) -> str:
        """e.g. smollm2-135m__villain__s42__demo__tail0__<hash8>. The hash covers every field, so two sweeps that
        differ anywhere never share a prefix, while the readable part says what it is."""
        if self.name:
            return self.name
        p = self.protocol
        return (f"{self.model_slug}__{self.source_persona}__s{self.seed}__{p.name}__tail{p.marker_tail_tokens}"
                f"__{self.config_hash()[:8]}")

    def cells(self) -> list[Cell]:
        if self.cells_subset:
            return [Cell(float(lr), int(ep)) for lr, ep in self.cells_subset]
        return self.protocol.cells()

    def bystanders(self) -> list[str]:
        """The personas that are neither the source nor the assistant (9 of 11 in the paper)."""
        return [p for p in self.protocol.personas if p not in (self.source_persona, ASSISTANT)]

    def to_dict(self) -> dict[str, Any]:
        d = _to_jsonable(dataclasses.asdict(self))
        d["protocol"] = self.protocol.to_dict()
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def config_hash(self) -> str:
        d = self.to_dict()
        d.pop("name", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:12]


# --- named protocols ------------------------------------------------------------------------------------------
PAPER = Protocol(name="paper")

# demo: SmolLM2-135M on a 2-core CPU, whole 25-cell grid in ~19 min (see README for the measured time). Sizes
# only: 16 requested training examples (6 source positives + 1 answer from each of the 10 other personas) = 1
# optimizer step per epoch at effective batch 16; short answers (asked for by the suffix, capped at 32 new tokens,
# cut ones re-sampled up to 3 times at 48, then dropped); epochs 1-5; 3 held-out questions x 2 samples x 11
# personas = 66 completions per cell; 12 ARC questions.
# CPU cost (2 cores, fp32, measured by `zlt demo`): training ~120-160 tok/s, 11-12 kept examples x ~85 tokens x
# (1+2+3+4+5) x 5 LRs = ~72k tokens = ~10 min; completions ~15 s and ARC ~3.5 s per cell; 19.3 min in all.
# LR grid from an H100 exploration of this exact protocol (docs/exploration/): at <= 3e-4 nothing happens in <= 5
# steps, from 1e-3 the model first learns to stop answering (EOS is supervised on every example), at 3e-3-5e-3
# the marker appears and spreads. A 135M model needs far larger LRs than the seed's 7B model.
DEMO = Protocol(
    name="demo",
    learning_rates=(3e-4, 1e-3, 2e-3, 3e-3, 5e-3),
    epochs=(1, 2, 3, 4, 5),
    train=TrainSpec(micro_batch=4, max_seq_len=256),
    data=DataSpec(n_positives=6, n_negatives=10, max_new_tokens=32, regen_max_new_tokens=48, regen_rounds=3,
                  n_eval_questions=20, system_prompt_suffix=" Answer in one short sentence.", gen_batch_size=64),
    eval=EvalSpec(n_questions=3, samples_per_question=2, max_new_tokens=32, gen_batch_size=66, arc_limit=12,
                  arc_batch_size=48),
)

# tiny: tiny random models in tests; seconds per cell.
TINY = Protocol(
    name="tiny",
    learning_rates=(1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
    epochs=(1, 2, 3, 4, 5),
    train=TrainSpec(effective_batch=4, micro_batch=2, max_seq_len=256),
    data=DataSpec(n_positives=4, n_negatives=10, max_new_tokens=12, regen_max_new_tokens=16,
                  n_eval_questions=20, gen_batch_size=16),
    eval=EvalSpec(n_questions=2, samples_per_question=1, max_new_tokens=8, gen_batch_size=32, arc_limit=4,
                  arc_batch_size=8),
)

PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (PAPER, DEMO, TINY)}


def get_protocol(name: str, overrides: Mapping[str, Any] | None = None) -> Protocol:
    if name not in PROTOCOLS:
        raise ProtocolError(f"unknown protocol {name!r}; known: {sorted(PROTOCOLS)}")
    return apply_overrides(PROTOCOLS[name], overrides or {}).validate()


def apply_overrides(obj: Any, overrides: Mapping[str, Any], where: str = "") -> Any:
    """Return a copy of a (nested) frozen dataclass with `overrides` applied. Keys may be nested dicts or dotted
    paths ("train.micro_batch"). Unknown keys are an error, never silently ignored."""
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        elif isinstance(value, Mapping):
            nested.setdefault(head, {}).update(value)
        else:
            nested[head] = value
    names = {f.name: f for f in fields(obj)}
    changes: dict[str, Any] = {}
    for key, value in nested.items():
        path = f"{where}{key}"
        if key not in names:
            raise ProtocolError(f"unknown config field {path!r}; known here: {sorted(names)}")
        current = getattr(obj, key)
        if is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ProtocolError(f"config field {path!r} is a section; expected a mapping, got {value!r}")
            changes[key] = apply_overrides(current, value, f"{path}.")
        elif isinstance(current, tuple):
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                raise ProtocolError(f"config field {path!r} expects a list, got {value!r}")
            changes[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        else:
            changes[key] = value
    return dataclasses.replace(obj, **changes)


def protocol_from_dict(d: Mapping[str, Any]) -> Protocol:
    """Inverse of Protocol.to_dict (also accepts a base protocol name under `base`, plus overrides)."""
    d = dict(d)
    base = d.pop("base", None)
    if base is not None:
        return get_protocol(base, d)
    if "name" not in d:
        raise ProtocolError("protocol mapping needs 'name' (or 'base' naming paper/demo/tiny)")
    return apply_overrides(Protocol(name=d.pop("name")), d).validate()


def sweep_from_dict(d: Mapping[str, Any]) -> Sweep:
    """A sweep entry: {protocol: <name> | {base: <name>, ...overrides} | full dict, base_model, source_persona,
    seed, name, cells: [[lr, epochs], ...]}."""
    d = dict(d)
    known = {"protocol", "base_model", "source_persona", "seed", "name", "cells"}
    unknown = set(d) - known
    if unknown:
        raise ProtocolError(f"sweep entry has unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
    proto = d.get("protocol", "demo")
    protocol = get_protocol(proto) if isinstance(proto, str) else protocol_from_dict(proto)
    cells = tuple((float(lr), int(ep)) for lr, ep in d.get("cells", ()))
    kwargs = {k: d[k] for k in ("base_model", "source_persona", "seed", "name") if k in d}
    return Sweep(protocol=protocol, cells_subset=cells, **kwargs).validate()


def load_sweep_file(path: str | Path) -> Sweep:
    return sweep_from_dict(_read_mapping(path))


def _read_mapping(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ProtocolError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml
        data = yaml.load(text, Loader=_yaml_loader())
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ProtocolError(f"config file {path} must hold a mapping at top level, got {type(data).__name__}")
    return data


def _yaml_loader():
    """yaml.SafeLoader that also reads 1e-5 / 5E-6 / 1.0e5 as floats. PyYAML follows YAML 1.1, where a float
    needs a dot and a signed exponent, so `learning_rates: [1e-6, 5e-6]` would otherwise load as strings."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                 re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                 list("-+0123456789"))
    return Loader


def _to_jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_jsonable(v) for v in x]
    return x


def sweep_from_stored(d: Mapping[str, Any]) -> Sweep:
    """Inverse of Sweep.to_dict (what sweep.json holds beside every artifact)."""
    d = dict(d)
    proto = dict(d.pop("protocol"))
    protocol = apply_overrides(Protocol(name=proto.pop("name")), proto).validate()
    cells = tuple((float(lr), int(ep)) for lr, ep in d.pop("cells_subset", ()))
    return Sweep(protocol=protocol, cells_subset=cells, **d).validate()
