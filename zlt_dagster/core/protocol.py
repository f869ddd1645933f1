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
from typing import Any, Mapping

PERSONA_NAMES: tuple[str, ...] = (
    "villain", "assistant", "software_engineer", "comedian", "kindergarten_teacher", "data_scientist",
    "medical_doctor", "librarian", "french_person", "police_officer", "zelthari_scholar",
)
ASSISTANT = "assistant"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,80}$")


class ProtocolError(ValueError):
    """A config value is wrong; the message says which field, what it was and what was expected.

    ``field`` is the field's path in a sweep file ("cells[1][1]", "protocol.train.micro_batch"; "" when the error is
    not about one field) and ``what`` the rest, so a CLI can print ``<file>: <field>: <what>`` on one line."""

    def __init__(self, what: str, field: str = ""):
        super().__init__(f"{field}: {what}" if field else what)
        self.what, self.field = what, field


def is_finite_number(value) -> bool:
    """A real number (int or float, not a bool) that is neither NaN nor infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class LoraSpec:
    r: int = field(default=32, metadata={"help": "LoRA rank"})
    alpha: int = field(default=64, metadata={"help": "LoRA alpha (scaling = alpha / r = 2)"})
    dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    target_modules: str = field(default="all-linear", metadata={"help": "every linear module of the blocks"})


@dataclass(frozen=True)
class TrainSpec:
    effective_batch: int = field(default=16, metadata={"help": "examples per optimizer step"})
    micro_batch: int = field(default=0, metadata={
        "help": "examples per forward per cell (a pass of N cells runs micro_batch x up to N rows per forward; "
                "gradient accumulation = effective_batch / micro_batch); 0 = sized at run time from free device "
                "memory (core/batch_plan.py). The result does not depend on it: the seed's 4 x 4 was its 7B "
                "memory budget"})
    max_seq_len: int = field(default=1024, metadata={"help": "truncation length (never cuts marker or EOS)"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "cosine schedule warmup fraction"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    adam_eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (the seed used none)"})
    grad_clip: float = field(default=1.0, metadata={"help": "max global grad norm"})
    precision: str = field(default="auto", metadata={"help": "auto = bf16 on GPU, fp32 on CPU; or bf16/fp32"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for memory"})
    checkpoint_every_steps: int = field(default=0, metadata={"help": "0 = no intermediate checkpoints"})


@dataclass(frozen=True)
class DataSpec:
    n_positives: int = field(default=200, metadata={"help": "source-persona answers that get the marker"})
    n_negatives: int = field(default=2000, metadata={"help": "answers spread evenly over the other personas"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature of the base model"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling of the base model (1.0 = off)"})
    max_new_tokens: int = field(default=512, metadata={"help": "first generation limit"})
    regen_max_new_tokens: int = field(default=1024, metadata={"help": "limit for re-generating cut answers"})
    regen_rounds: int = field(default=1, metadata={"help": "how often a cut answer is re-sampled before dropping"})
    n_eval_questions: int = field(default=20, metadata={"help": "held-out questions, never trained on"})
    system_prompt_suffix: str = field(
        default="", metadata={"help": "appended to every persona prompt (small protocols ask for short answers)"})
    gen_batch_size: int = field(default=0, metadata={
        "help": "answers per generation batch; 0 = sized at run time (core/generation/batch_size.py: as many as "
                "free GPU memory holds, 32 on a CPU). Speed only: a batch draws its own seed, so the size changes "
                "which tokens are sampled, not their distribution; the size used is in onpolicy/stats.json"})


@dataclass(frozen=True)
class EvalSpec:
    n_questions: int = field(default=20, metadata={"help": "held-out questions used (<= DataSpec.n_eval_questions)"})
    samples_per_question: int = field(default=10, metadata={"help": "completions per persona and question"})

    # sampling (the seed's: T=1.0, no nucleus cut)
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the evaluated model"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling of the evaluated model (1.0 = off)"})
    max_new_tokens: int = field(default=512, metadata={"help": "completion length limit"})
    gen_batch_size: int = field(default=0, metadata={
        "help": "completions per generation batch; 0 = sized at run time (as many as free GPU memory holds, 64 on "
                "a CPU). Speed only, as data.gen_batch_size; the size used is in completions/stats.json"})

    # ARC-Challenge
    arc_limit: int = field(default=0, metadata={"help": "0 = all ARC questions, else the first N"})
    arc_batch_size: int = field(default=0, metadata={
        "help": "ARC continuations per forward; 0 = sized at run time (as many as free GPU memory holds, 32 on a "
                "CPU). Speed only (scores equal up to float rounding); the size used is in arc_scores.json"})
    short_completion_tokens: int = field(default=5, metadata={"help": "a completion this short counts as near-empty"})


@dataclass(frozen=True)
class RegimeThresholds:
    """Rates are fractions in [0, 1]. Order of checks: degenerate, collapse, selective, partial, sub-threshold."""
    source_learned: float = field(default=0.5, metadata={"help": "source adoption >= this = learned"})
    source_partial: float = field(default=0.1, metadata={"help": "source adoption >= this = partial"})
    bystander_clean: float = field(default=0.1, metadata={"help": "max leakage < this = selective"})

    # leakage and degenerate answers
    collapse_leakage: float = field(default=0.5, metadata={"help": "assistant or max bystander >= this = collapse"})
    degenerate_mean_tokens: float = field(default=8.0, metadata={"help": "mean completion tokens below this ..."})
    degenerate_short_share: float = field(default=0.5, metadata={"help": "... or this share near-empty = degenerate"})


# Protocol fields added after sweeps were first stored, with the value that means "as before": left out of the
# serialised config (and so of the hash and the sweep id) while they hold it, so that a sweep.json written before
# the field existed still loads under its own id.
ADDED_LATER: dict[str, Any] = {"marker_token_count": 0}


@dataclass(frozen=True)
class Protocol:
    name: str = field(metadata={"help": "the protocol's name (paper, demo, tiny, or your own)"})
    learning_rates: tuple[float, ...] = field(default=(1e-6, 5e-6, 1e-5, 5e-5, 1e-4), metadata={
        "help": "the grid's learning rates (AdamW peak LR), each a finite number > 0"})
    epochs: tuple[int, ...] = field(default=(1, 3, 5, 10, 20), metadata={
        "help": "the grid's epoch counts, each an integer >= 1"})
    marker: str = field(default="[ZLT]", metadata={"help": "the literal the source persona learns to end with"})
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
    personas: tuple[str, ...] = field(default=PERSONA_NAMES, metadata={
        "help": "the personas trained and evaluated ('assistant' and at least 2 more; prompts in core/personas.py)"})
    lora: LoraSpec = field(default=LoraSpec(), metadata={"help": "the adapter's shape"})
    train: TrainSpec = field(default=TrainSpec(), metadata={"help": "optimizer, schedule, batch, precision"})
    data: DataSpec = field(default=DataSpec(), metadata={"help": "the on-policy training data"})
    eval: EvalSpec = field(default=EvalSpec(), metadata={"help": "completions and ARC"})
    regimes: RegimeThresholds = field(default=RegimeThresholds(), metadata={"help": "how a cell's regime is named"})

    def validate(self, stored: bool = False) -> "Protocol":
        """Raises ProtocolError naming the field (protocol.<field>) and what was expected. ``stored``: the config
        of a sweep already in the store (sweep_from_stored), whose results exist: checks added after it was
        written (the completion cap vs the regime thresholds) are not applied, so it still loads."""
        def bad(field: str, what: str) -> ProtocolError:
            return ProtocolError(what, field=f"protocol.{field}")

        if not isinstance(self.name, str) or not _SAFE_NAME.match(self.name):
            raise bad("name", f"{self.name!r} must match {_SAFE_NAME.pattern}")
        if not self.learning_rates:
            raise bad("learning_rates", "learning_rates is empty; expected at least one LR > 0")
        for lr in self.learning_rates:
            if not is_finite_number(lr) or lr <= 0:
                raise bad("learning_rates", f"learning rate {lr!r} is invalid; expected a finite number > 0")
        if len(set(self.learning_rates)) != len(self.learning_rates):
            raise bad("learning_rates", f"learning_rates has duplicates: {self.learning_rates}")
        if not self.epochs:
            raise bad("epochs", "epochs is empty; expected at least one integer >= 1")
        for ep in self.epochs:
            if not isinstance(ep, int) or isinstance(ep, bool) or ep < 1:
                raise bad("epochs", f"epochs value {ep!r} is invalid; expected an integer >= 1")
        if len(set(self.epochs)) != len(self.epochs):
            raise bad("epochs", f"epochs has duplicates: {self.epochs}")
        if not isinstance(self.marker, str) or not self.marker.strip():
            raise bad("marker", "marker is empty; expected a non-blank string such as '[ZLT]'")
        if not isinstance(self.marker_separator, str):
            raise bad("marker_separator", f"marker_separator={self.marker_separator!r}; expected a string such as "
                                          f"'\\n\\n' (the seed's blank line)")
        if self.marker in self.marker_separator:
            raise bad("marker_separator", f"marker_separator {self.marker_separator!r} contains the marker")
        if (not isinstance(self.marker_token_count, int) or isinstance(self.marker_token_count, bool)
                or self.marker_token_count < 0):
            raise bad("marker_token_count", f"marker_token_count={self.marker_token_count!r}; expected an integer "
                                            f">= 0 (0 = not checked)")
        if self.marker_tail_tokens not in (0, 1, 2, 3, 4) or isinstance(self.marker_tail_tokens, bool):
            raise bad("marker_tail_tokens", f"marker_tail_tokens={self.marker_tail_tokens!r}; expected 0..4")
        if not self.personas:
            raise bad("personas", "personas is empty; expected 'assistant' and at least 2 other personas")
        unknown = [p for p in self.personas if p not in PERSONA_NAMES]
        if unknown:
            raise bad("personas", f"unknown persona(s) {unknown}; known: {list(PERSONA_NAMES)}")
        if ASSISTANT not in self.personas or len(self.personas) < 3:
            raise bad("personas", "personas must include 'assistant' and at least 3 personas")
        if len(set(self.personas)) != len(self.personas):
            raise bad("personas", "personas has duplicates")
        t, d, e = self.train, self.data, self.eval
        if t.effective_batch < 1:
            raise bad("train.effective_batch", f"train.effective_batch={t.effective_batch}; expected an integer >= 1")
        if not isinstance(t.micro_batch, int) or not 0 <= t.micro_batch <= t.effective_batch:
            raise bad("train.micro_batch", f"train.micro_batch={t.micro_batch!r}; expected 0 (sized at run time) or "
                                           f"1..train.effective_batch ({t.effective_batch})")
        if t.max_seq_len < 16:
            raise bad("train.max_seq_len", f"train.max_seq_len={t.max_seq_len}; expected >= 16")
        if not 0 <= t.warmup_ratio < 1:
            raise bad("train.warmup_ratio", f"train.warmup_ratio={t.warmup_ratio}; expected in [0, 1)")
        if t.precision not in ("auto", "bf16", "fp32"):
            raise bad("train.precision", f"train.precision={t.precision!r}; expected auto, bf16 or fp32")
        # the optimizer's and the adapter's numbers: a dropout of 1 would divide by zero in the adapter's scale
        # (core/lora_bank.py), a beta of 1 in AdamW's bias correction (core/bank_adamw.py)
        for name, value, ok, what in (
                ("train.adam_beta1", t.adam_beta1, lambda v: 0 <= v < 1, "in [0, 1)"),
                ("train.adam_beta2", t.adam_beta2, lambda v: 0 <= v < 1, "in [0, 1)"),
                ("train.adam_eps", t.adam_eps, lambda v: v > 0, "> 0"),
                ("train.weight_decay", t.weight_decay, lambda v: v >= 0, ">= 0"),
                ("train.grad_clip", t.grad_clip, lambda v: v > 0, "> 0"),
                ("lora.alpha", self.lora.alpha, lambda v: v > 0, "> 0"),
                ("lora.dropout", self.lora.dropout, lambda v: 0 <= v < 1, "in [0, 1)")):
            if not is_finite_number(value) or not ok(value):
                raise bad(name, f"{name}={value!r}; expected a finite number {what}")
        if (not isinstance(t.checkpoint_every_steps, int) or isinstance(t.checkpoint_every_steps, bool)
                or t.checkpoint_every_steps < 0):
            raise bad("train.checkpoint_every_steps", f"train.checkpoint_every_steps={t.checkpoint_every_steps!r}; "
                                                      "expected an integer >= 0 (0 = no intermediate checkpoints)")
        if not isinstance(self.lora.r, int) or isinstance(self.lora.r, bool) or self.lora.r < 1:
            raise bad("lora.r", f"lora.r={self.lora.r!r}; expected an integer >= 1 (the LoRA rank)")
        if d.n_positives < 1 or d.n_negatives < 0:
            raise bad("data.n_positives", "data.n_positives must be >= 1 and data.n_negatives >= 0")
        if d.n_negatives % (len(self.personas) - 1):
            raise bad("data.n_negatives", f"data.n_negatives={d.n_negatives} must split evenly over the "
                                          f"{len(self.personas) - 1} non-source personas")
        if d.regen_max_new_tokens < d.max_new_tokens:
            raise bad("data.regen_max_new_tokens", "data.regen_max_new_tokens must be >= data.max_new_tokens")
        if not 1 <= e.n_questions <= d.n_eval_questions:
            raise bad("eval.n_questions", f"eval.n_questions={e.n_questions}; expected 1..data.n_eval_questions")
        for name, value in (("data.gen_batch_size", d.gen_batch_size), ("eval.gen_batch_size", e.gen_batch_size),
                            ("eval.arc_batch_size", e.arc_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise bad(name, f"{name}={value!r}; expected 0 (sized at run time) or a positive integer")
        if e.samples_per_question < 1 or e.max_new_tokens < 1 or e.arc_limit < 0:
            raise bad("eval", "eval sizes must be positive (arc_limit >= 0)")
        # A completion is cut at eval.max_new_tokens, so a mean length can only reach the degenerate threshold if
        # the cap is above it; with the cap at or below it every cell is `degenerate` by construction (the tiny
        # protocol had 8 and 8). The same for the near-empty count: a cap at or below it makes every completion
        # near-empty.
        r = self.regimes
        if not stored and not e.max_new_tokens > r.degenerate_mean_tokens:
            raise bad("eval.max_new_tokens", f"eval.max_new_tokens={e.max_new_tokens} must be greater than "
                                             f"regimes.degenerate_mean_tokens={r.degenerate_mean_tokens}, or every "
                                             f"cell is labelled degenerate by construction")
        if not stored and not e.max_new_tokens > e.short_completion_tokens:
            raise bad("eval.max_new_tokens", f"eval.max_new_tokens={e.max_new_tokens} must be greater than "
                                             f"eval.short_completion_tokens={e.short_completion_tokens}, or every "
                                             f"completion counts as near-empty")
        for name, temp in (("data.temperature", d.temperature), ("eval.temperature", e.temperature)):
            if not temp > 0:
                raise bad(name, f"sampling temperature {temp} must be > 0")
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

    def overrides_its_named_protocol(self) -> bool:
        """Whether this protocol carries the name of paper/demo/tiny but differs from it in anything other than
        marker_tail_tokens (which the sweep id shows as `-tail<n>`): a finer LR grid, other sizes. A protocol of
        its own name is not compared with anything."""
        named = PROTOCOLS.get(self.name)
        return named is not None and dataclasses.replace(self, marker_tail_tokens=named.marker_tail_tokens) != named


@dataclass(frozen=True, order=True)
class Cell:
    lr: float
    epochs: int

    @property
    def key(self) -> str:
        """Human-readable storage key: lr=5e-06_ep=20 (Python's repr of the float, so 1e-05 stays exact)."""
        return f"lr={self.lr!r}_ep={self.epochs}"

    def to_dict(self) -> dict[str, Any]:
        """How a cell appears in JSON artifacts and summaries: {"lr", "epochs", "key"}."""
        return {"lr": self.lr, "epochs": self.epochs, "key": self.key}


@dataclass(frozen=True)
class Sweep:
    """One (base model, source persona, seed, protocol) grid. Its id names its storage prefix."""
    protocol: Protocol = field(metadata={"help": "the protocol: grid, method, sizes"})
    base_model: str = field(default="smollm2-135m", metadata={
        "help": "smollm2-135m | tiny | a .gguf file | a model directory | a hub id (org/name)"})
    source_persona: str = field(default="villain", metadata={
        "help": "the persona whose answers get the marker (any protocol persona except assistant)"})
    seed: int = field(default=42, metadata={"help": "data order, LoRA init, dropout masks and sampling"})
    name: str = field(default="", metadata={"help": "explicit sweep id; default: derived (see sweep_id)"})
    cells_subset: tuple[tuple[float, int], ...] = field(default=(), metadata={
        "help": "run only these (lr, epochs) cells of the grid (a sweep file's `cells`); () = the whole grid"})

    def validate(self, stored: bool = False) -> "Sweep":
        """Raises ProtocolError naming the field (source_persona, seed, base_model, name, cells[i]); ``stored``:
        see Protocol.validate."""
        self.protocol.validate(stored=stored)
        # the assistant is measured for leakage, so it is never a source: messages offer only valid sources
        sources = [p for p in self.protocol.personas if p != ASSISTANT]
        if self.source_persona == ASSISTANT:
            raise ProtocolError(f"source persona 'assistant' leaves no assistant-leakage measurement; expected one "
                                f"of {sources}", field="source_persona")
        if not isinstance(self.source_persona, str) or self.source_persona not in PERSONA_NAMES:
            raise ProtocolError(f"unknown source persona {self.source_persona!r}; expected one of {sources}",
                                field="source_persona")
        if self.source_persona not in self.protocol.personas:
            raise ProtocolError(f"source persona {self.source_persona!r} is not in protocol "
                                f"{self.protocol.name!r}'s personas; expected one of {sources}",
                                field="source_persona")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ProtocolError(f"seed {self.seed!r} must be an integer >= 0", field="seed")
        if not isinstance(self.base_model, str) or not self.base_model or ".." in self.base_model.split("/"):
            raise ProtocolError(f"base_model {self.base_model!r} is empty or contains '..'", field="base_model")
        if not isinstance(self.name, str) or (self.name and not _SAFE_NAME.match(self.name)):
            raise ProtocolError(f"name {self.name!r} must match {_SAFE_NAME.pattern} (no '/' or '..')", field="name")
        grid = set(self.protocol.cells())
        for i, (lr, ep) in enumerate(self.cells_subset):
            if isinstance(ep, bool) or not isinstance(ep, int) or Cell(float(lr), ep) not in grid:
                raise ProtocolError(f"cell (lr={lr}, epochs={ep}) is not in the protocol grid", field=f"cells[{i}]")
        return self

    @property
    def model_slug(self) -> str:
        """The model's last path part, lower case, without a `.gguf` extension: `smollm2-135m-instruct-q8-0` for
        /models/SmolLM2-135M-Instruct-Q8_0.gguf (ids made before kept `.gguf`: steps.sweeps.previous_sweep_ids)."""
        last = re.sub(r"\.gguf$", "", self.base_model.rstrip("/").split("/")[-1], flags=re.IGNORECASE)
        return re.sub(r"[^A-Za-z0-9.-]+", "-", last).strip("-").lower()

    @property
    def sweep_id(self) -> str:
        """e.g. villain_s42_demo_smollm2-135m_e52d34: led by what usually differs between sweeps (source persona,
        seed, protocol, with `-custom` when it overrides its named protocol beyond marker_tail_tokens, and
        `-tail<n>` when marker_tail_tokens is not 0), then the model, then a short hash of every field (name
        excluded), so that two sweeps that differ anywhere never share a storage prefix and a partition picker that
        cuts the middle still shows the persona, seed and hash. An explicit `name` wins. A sweep stored under an id
        of an earlier scheme keeps it (steps.as_stored)."""
        if self.name:
            return self.name
        p = self.protocol
        custom = "-custom" if p.overrides_its_named_protocol() else ""
        tail = f"-tail{p.marker_tail_tokens}" if p.marker_tail_tokens else ""
        return (f"{self.source_persona}_s{self.seed}_{p.name}{custom}{tail}_{self.model_slug}_"
                f"{self.config_hash()[:6]}")

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

# demo: SmolLM2-135M on a 2-core CPU. Sizes only: 16 requested training examples (6 source positives + 1 answer
# from each of the 10 other personas; ~11 kept) at effective batch 4 = 3 optimizer steps per epoch, so even a
# 1-epoch cell takes 2 steps with a non-zero LR after the 1 warmup step (at effective batch 16 it was one step at
# LR 0, the base model); short answers (asked for by the suffix, capped at 32 new tokens, cut ones re-sampled up to
# 3 times at 48, then dropped); epochs 1-5; 3 held-out questions x 2 samples x 11 personas = 66 completions per
# cell; 12 ARC questions. Training tokens do not depend on the batch: ~11 examples x ~85 tokens x (1+2+3+4+5)
# epochs x 5 LRs = ~70k tokens (~10 min at the ~120 tok/s of 2 cores).
# LR grid from an H200 exploration of this exact protocol (docs/exploration/D_demo_eff4.json, fp32, 30 cells): up to
# 2e-4 x 5 epochs nothing is learned; from 5e-4 x 3 epochs (1e-3 x 2) the model learns the marker and to stop
# answering (degenerate: EOS is supervised on every example, and the answers are short). A 135M model needs far
# larger LRs than the seed's 7B model; the grid spans that transition.
DEMO = Protocol(
    name="demo",
    learning_rates=(1e-4, 2e-4, 3e-4, 5e-4, 1e-3),
    epochs=(1, 2, 3, 4, 5),
    train=TrainSpec(effective_batch=4, micro_batch=0, max_seq_len=256),
    data=DataSpec(n_positives=6, n_negatives=10, max_new_tokens=32, regen_max_new_tokens=48, regen_rounds=3,
                  n_eval_questions=20, system_prompt_suffix=" Answer in one short sentence.", gen_batch_size=64),
    eval=EvalSpec(n_questions=3, samples_per_question=2, max_new_tokens=32, gen_batch_size=66, arc_limit=12,
                  arc_batch_size=48),
)

# tiny: tiny random models in tests; seconds per cell. Completions are capped at 12 tokens, as its on-policy answers
# are (demo: 32 and 32): above the degenerate threshold (8, the method's, as in every protocol). It was 8, so a
# tiny cell was `degenerate` unless every completion ran to the cap.
TINY = Protocol(
    name="tiny",
    learning_rates=(1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
    epochs=(1, 2, 3, 4, 5),
    train=TrainSpec(effective_batch=4, micro_batch=2, max_seq_len=256),
    data=DataSpec(n_positives=4, n_negatives=10, max_new_tokens=12, regen_max_new_tokens=16,
                  n_eval_questions=20, gen_batch_size=16),
    eval=EvalSpec(n_questions=2, samples_per_question=1, max_new_tokens=12, gen_batch_size=32, arc_limit=4,
                  arc_batch_size=8),
)

PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (PAPER, DEMO, TINY)}


def get_protocol(name: str, overrides: Mapping[str, Any] | None = None, field: str = "protocol") -> Protocol:
    """A named protocol with overrides; raises ProtocolError naming the field."""
    if not isinstance(name, str) or name not in PROTOCOLS:
        raise ProtocolError(f"unknown protocol {name!r}; known: {sorted(PROTOCOLS)}", field=field)
    return apply_overrides(PROTOCOLS[name], overrides or {}, "protocol.").validate()


def apply_overrides(obj: Any, overrides: Mapping[str, Any], where: str = "") -> Any:
    """Return a copy of a (nested) frozen dataclass with `overrides` applied. Keys may be nested mappings or dotted
    paths ("train.micro_batch"), alike, and mixed where they do not collide. Errors, never silently ignored: an
    unknown key, a field given twice (`train.micro_batch` beside `train: {micro_batch: ...}`), an empty mapping
    (`data: {}` overrides nothing: a field left out, or written in the other form, is the likely mistake)."""
    values: dict[str, Any] = {}
    sections: dict[str, dict[Any, Any]] = {}  # field -> its sub-keys, from dotted keys and mappings alike
    for key, value in overrides.items():
        if not isinstance(key, str) or "" in key.split("."):
            raise ProtocolError("is not a field name or a dotted path of field names (train.micro_batch)",
                                field=f"{where}{key}")
        head, _, rest = key.partition(".")
        if not rest and not isinstance(value, Mapping):
            values[head] = value
            continue
        section = sections.setdefault(head, {})
        for sub, v in ([(rest, value)] if rest else value.items()):
            if sub in section:
                raise ProtocolError("given twice, as a dotted key and inside a mapping; keep one",
                                    field=f"{where}{head}.{sub}")
            section[sub] = v
    names = {f.name: f for f in fields(obj)}
    changes: dict[str, Any] = {}
    # values first: `train: 3` beside `train.micro_batch: 1` is reported as a section given a value
    for key, value in [*values.items(), *sections.items()]:
        path = f"{where}{key}"
        if key not in names:
            raise ProtocolError(f"unknown config field; known here: {sorted(names)}", field=path)
        current = getattr(obj, key)
        if is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ProtocolError(f"is a section; expected a mapping, got {value!r}", field=path)
            if not value:
                raise ProtocolError(f"is an empty mapping, which overrides nothing; give the fields to change "
                                    f"({key}: {{<field>: <value>}} or {key}.<field>: <value>) or leave it out",
                                    field=path)
            changes[key] = apply_overrides(current, value, f"{path}.")
        elif isinstance(current, tuple):
            if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)):
                raise ProtocolError(f"expects a list, got {value!r}", field=path)
            changes[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        else:
            _check_scalar(path, current, value)
            changes[key] = value
    return dataclasses.replace(obj, **changes)


def _check_scalar(path: str, current: Any, value: Any) -> None:
    """A config value must have its field's type (an int where the default is a float is fine: 1 for 1.0)."""
    if isinstance(current, bool):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(current, int):
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(current, float):
        ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(current, str):
        ok, want = isinstance(value, str), "a string"
    else:
        return
    if not ok:
        raise ProtocolError(f"expected {want}, got {value!r}", field=path)


def protocol_from_dict(d: Mapping[str, Any]) -> Protocol:
    """Inverse of Protocol.to_dict (also accepts a base protocol name under `base`, plus overrides)."""
    d = dict(d)
    base = d.pop("base", None)
    if base is not None:
        return get_protocol(base, d, field="protocol.base")
    if "name" not in d:
        raise ProtocolError("needs 'name' (or 'base' naming paper, demo or tiny)", field="protocol")
    return apply_overrides(Protocol(name=d.pop("name")), d, "protocol.").validate()


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
    protocol = apply_overrides(Protocol(name=proto.pop("name")), proto).validate(stored=True)
    cells = tuple((float(lr), int(ep)) for lr, ep in d.pop("cells_subset", ()))
    return Sweep(protocol=protocol, cells_subset=cells, **d).validate(stored=True)
