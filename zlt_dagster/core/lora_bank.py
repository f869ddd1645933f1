"""K LoRA adapters over one frozen base: what lets 1..N cells of a sweep train in one pass.

Every LoRA'd Linear of the base is replaced, for the duration of training, by a `MultiLoRALinear` that holds one
(A, B) pair per cell. A forward pass carries rows in equal contiguous blocks, one block per *active* cell (the
cells being trained in this pass, `LoraBank.active`); block c only ever goes through adapter `active[c]`
("per-example adapter routing"), so the summed loss sum_c loss_c has d/d(adapter j) = d loss_j / d(adapter j)
and every cell gets exactly the gradient a run of its own would. Same arithmetic as peft's LoRA Linear:
    y = base(x) + B(A(dropout(x))) * alpha / r
over an fp32 base in fp32 (CPU; what the tests compare); over a bf16 base the adapter's matmuls run in bf16 from
its fp32 master weights, which is what the seed's HF Trainer (bf16=True: torch.autocast) did with peft's fp32
adapters. peft without autocast would cast the bf16 activations up and run them in fp32 instead: on a 7B model
that keeps ~9 MB of fp32 copies per token for the backward pass (measured: BENCHMARKS.md).

Dropout masks are not drawn from the global RNG (as peft's nn.Dropout would) but from a generator seeded per
(sweep seed, epoch, example index), one stream per example covering every LoRA'd module: a mask then depends on
which example it is and nothing else, so a cell's adapter does not change with the micro-batch size (sized at run
time from free memory), with which other cells it was trained beside, or with a resume from a checkpoint.
Masks are shared by all cells (separate runs with one seed would draw the same masks too).

The initialisation is peft's: `attach` builds a peft model once with `torch.manual_seed(seed)` and copies its
A (kaiming-uniform) and B (zeros) into every cell, and `save_peft` writes a standard PEFT adapter directory.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .models import quiet_peft
from .protocol import Protocol


def lora_config(protocol: Protocol):
    """peft LoraConfig of the protocol (r, alpha, dropout, all-linear targets; SPEC "LoRA")."""
    from peft import LoraConfig

    lc = protocol.lora
    return LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules,
                      bias="none", task_type="CAUSAL_LM")


def example_key(seed: int, epoch: int, index: int) -> int:
    """The dropout stream of one example in one epoch: a 63-bit integer from (seed, epoch, example index)."""
    digest = hashlib.blake2b(f"zlt-dropout:{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass
class _Routing:
    """Shared by every MultiLoRALinear of one bank: which cells this forward carries and the dropout keep-masks."""
    active: list[int] = field(default_factory=list)
    # the same cells as an int64 tensor on the model's device: the forward selects adapters with it, not with the
    # list, so one compiled graph (torch.compile, core/train.py) serves every set of active cells of any size >= 2
    index: torch.Tensor | None = None
    select: torch.Tensor | None = None  # the same as one-hot rows, float32 [len(active), cells in the bank]
    autocast: bool = True              # over a bf16/fp16 base, run the adapter's matmuls in that dtype


class MultiLoRALinear(torch.nn.Module):
    """A frozen Linear plus K LoRA adapters (see the module docstring). Input [rows, width, in] with rows =
    len(routing.active) x block rows; output [rows, width, out] in the base's dtype."""

    def __init__(self, base: torch.nn.Linear, a_init: torch.Tensor, b_init: torch.Tensor, k: int, scale: float,
                 dropout: float, offset: int, routing: _Routing):
        super().__init__()
        self.base = base
        self.scale, self.dropout, self.offset = scale, dropout, offset
        self.routing = routing
        self.k = k
        # this module's columns of the micro-batch's dropout keep-mask (a view, set by LoraBank.set_batch), not an
        # offset into the whole mask: no per-module integer in the forward, so torch.compile gives every layer
        # the same graph (core/train.py)
        self.keep: torch.Tensor | None = None
        self.in_features = base.in_features
        # the dtype peft chose for the adapter (fp32 over a bf16 base: peft's autocast_adapter_dtype)
        self.lora_A = torch.nn.ParameterList([torch.nn.Parameter(a_init.detach().clone()) for _ in range(k)])
        self.lora_B = torch.nn.ParameterList([torch.nn.Parameter(b_init.detach().clone()) for _ in range(k)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        index = self.routing.index
        k = index.shape[0]
        if x.shape[0] % k:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {k} cell blocks")
        if self.routing.autocast and x.dtype in (torch.bfloat16, torch.float16):
            return result + self._delta(x, index, x.dtype) * self.scale  # the adapter's matmuls in bf16
        delta = self._delta(x.to(self.lora_A[0].dtype), index, None)
        return (result + delta * self.scale).to(result.dtype)

    def _delta(self, xa: torch.Tensor, index: torch.Tensor, cast: torch.dtype | None) -> torch.Tensor:
        """B(A(dropout(xa))) of each row block with its cell's adapter; weights cast to `cast` if given (their
        fp32 master copies receive the gradients)."""
        k, x = index.shape[0], xa
        mask = self.keep                                                            # [block rows, width, in]
        if mask is not None and self.training:
            xa = torch.where(mask, xa.reshape(k, *mask.shape) * (1.0 / (1.0 - self.dropout)), 0.0).reshape(x.shape)
        if self.k == 1:  # a bank of one cell: plain matmuls, as peft's Linear
            a, b = self.lora_A[0], self.lora_B[0]
            if cast is not None:
                a, b = a.to(cast), b.to(cast)
            return (xa @ a.t()) @ b.t()
        # every cell stacked, then the active ones picked by a tensor (a finished cell's gradient is zeros; it is
        # never stepped again): no Python indices inside the graph, so torch.compile does not recompile per set
        a_all, b_all = torch.stack(tuple(self.lora_A)), torch.stack(tuple(self.lora_B))  # [K, r, in], [K, out, r]
        if torch.compiler.is_compiling():
            # a one-hot weighted sum, exact (x1 and +0), fused by inductor into one reduction: inductor's
            # index_select computed a forward of ONE cell out of a bank of two wrongly (float64 on the CPU: that
            # cell stopped learning; tests/core/test_train_group.py::test_inductor_...)
            sel = self.routing.select.to(a_all.dtype)[:, :, None, None]             # [k, K, 1, 1]
            a, b = (sel * a_all).sum(1), (sel * b_all).sum(1)
        else:
            a, b = a_all.index_select(0, index), b_all.index_select(0, index)     # [k, r, in], [k, out, r]
        if cast is not None:
            a, b = a.to(cast), b.to(cast)
        xs = xa.reshape(k, -1, x.shape[-1])
        delta = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2))
        return delta.reshape(*x.shape[:-1], delta.shape[-1])


def _set_module(root: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


class LoraBank:
    """K cells' LoRA adapters attached to `model` (a transformers causal LM). Use as a context manager: the base
    gets its original Linear modules back on exit, bit-identical (they are never modified)."""

    def __init__(self, model: torch.nn.Module, protocol: Protocol, seed: int, k: int):
        if k < 1:
            raise ValueError(f"a LoRA bank needs at least one cell, got k={k}")
        self.model, self.protocol, self.k = model, protocol, k
        self.device = next(model.parameters()).device
        self._indices: dict[tuple[int, ...], torch.Tensor] = {}
        self.routing = _Routing()
        init, self.scale = _peft_initialisation(model, protocol, seed)
        self.dropout = float(protocol.lora.dropout)
        self.originals = {name: model.get_submodule(name) for name in init}
        self.modules: dict[str, MultiLoRALinear] = {}
        offset = 0
        for name, (a, b) in init.items():
            base = self.originals[name]
            self.modules[name] = MultiLoRALinear(base, a, b, k, self.scale, self.dropout, offset, self.routing)
            offset += base.in_features
        self.total_in = offset  # dropout features per token: sum of every LoRA'd module's input width
        self.set_batch(range(k), None)
        self._attached = False

    def __enter__(self) -> "LoraBank":
        for name, mod in self.modules.items():
            _set_module(self.model, name, mod)
        self._attached = True
        return self

    def __exit__(self, *exc) -> None:
        for name, orig in self.originals.items():
            _set_module(self.model, name, orig)
        self._attached = False
        self.set_batch(self.routing.active, None)

    @contextlib.contextmanager
    def detached(self) -> Iterator[None]:
        """The base with its original modules for the duration (e.g. to save a PEFT adapter), then attached again."""
        self.__exit__(None, None, None)
        try:
            yield
        finally:
            self.__enter__()

    def params(self, j: int) -> dict[str, torch.nn.Parameter]:
        """Cell j's trainable tensors by name (`<module>.lora_A`, `<module>.lora_B`): what a checkpoint holds."""
        out = {}
        for name, mod in self.modules.items():
            out[f"{name}.lora_A"] = mod.lora_A[j]
            out[f"{name}.lora_B"] = mod.lora_B[j]
        return out

    def set_batch(self, active: Sequence[int], keep: torch.Tensor | None) -> None:
        """Route the next forward: row block c goes through cell active[c]'s adapter; `keep` as from keep_masks."""
        active = tuple(active)
        if active not in self._indices:  # small host-to-device copies per distinct set, not per forward
            index = torch.tensor(active, dtype=torch.long, device=self.device)
            select = torch.zeros((len(active), self.k), dtype=torch.float32, device=self.device)
            select[torch.arange(len(active), device=self.device), index] = 1.0
            self._indices[active] = (index, select)
        self.routing.active = list(active)
        self.routing.index, self.routing.select = self._indices[active]
        for mod in self.modules.values():
            mod.keep = None if keep is None else keep[..., mod.offset:mod.offset + mod.in_features].contiguous()

    def keep_masks(self, keys: Sequence[int], lengths: Sequence[int], width: int, device) -> torch.Tensor | None:
        """Dropout keep-masks of one micro-batch: bool [len(keys), width, total_in]; row r is drawn from a
        generator seeded by keys[r] (see example_key) over its first lengths[r] positions only, so it does not
        depend on the padding width or on the other rows. Padded positions keep everything (they never reach a
        supervised position: right padding under a causal mask). None when dropout is 0."""
        if self.dropout <= 0:
            return None
        keep = torch.ones((len(keys), width, self.total_in), dtype=torch.bool, device=device)
        gen = torch.Generator(device=device)
        for row, (key, n) in enumerate(zip(keys, lengths)):
            gen.manual_seed(key)
            keep[row, :n] = torch.rand((n, self.total_in), generator=gen, device=device) >= self.dropout
        return keep

    def save_peft(self, j: int, out_dir: str | Path, base_model_name: str) -> None:
        """Write cell j's adapter as a standard PEFT directory (adapter_config.json + adapter_model.safetensors),
        loadable by `PeftModel.from_pretrained` and vLLM. The bank must be detached (base modules restored)."""
        from peft import get_peft_model

        if self._attached:
            raise RuntimeError("detach the LoRA bank before saving a PEFT adapter")
        config = lora_config(self.protocol)
        config.init_lora_weights = False  # overwritten below: skip peft's random init (~0.1 s per adapter saved)
        with quiet_peft():
            pm = get_peft_model(self.model, config)
        try:
            mods = dict(pm.get_base_model().named_modules())
            with torch.no_grad():
                for name, mod in self.modules.items():
                    mods[name].lora_A["default"].weight.copy_(mod.lora_A[j])
                    mods[name].lora_B["default"].weight.copy_(mod.lora_B[j])
            pm.eval()
            pm.peft_config["default"].init_lora_weights = True  # the file records the protocol's config as before
            out_dir = Path(out_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            with quiet_peft():
                pm.save_pretrained(str(out_dir), safe_serialization=True)
        finally:
            pm.unload()
        _fix_adapter_base_name(out_dir, base_model_name)


def _peft_initialisation(model, protocol: Protocol, seed: int) -> tuple[dict, float]:
    """{module name: (A, B)} as peft initialises them under torch.manual_seed(seed), and the LoRA scale."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    with quiet_peft():
        pm = get_peft_model(model, lora_config(protocol))
    try:
        init, scale = {}, None
        for name, mod in pm.get_base_model().named_modules():
            if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                init[name] = (mod.lora_A["default"].weight.detach().clone(),
                              mod.lora_B["default"].weight.detach().clone())
                scale = mod.scaling["default"]
    finally:
        pm.unload()
    if not init:
        raise RuntimeError("peft attached no LoRA modules to this model; nothing to train")
    return init, float(scale)


def _fix_adapter_base_name(out_dir: Path, base_model: str) -> None:
    """peft writes the local cache path of a de-quantised GGUF; record the sweep's model name instead. peft also
    writes its module sets (target_modules, ...) in set order, which changes with each process's hash seed: sort
    them and the keys, so the same training writes a byte-identical adapter_config.json."""
    cfg_path = out_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = base_model
    for key, value in cfg.items():
        if key.endswith("_modules") and isinstance(value, list) and all(isinstance(v, str) for v in value):
            cfg[key] = sorted(value)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
