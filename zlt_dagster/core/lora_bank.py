"""K LoRA adapters over one frozen base: what lets 1..N cells of a sweep train in one pass.

Every LoRA'd Linear of the base is replaced, for the duration of training, by a `MultiLoRALinear` that holds one
(A, B) pair per cell, as [K, ...] views of one [K, P] buffer (`LoraBank.weights`, one row per cell; gradients in
`LoraBank.grads`, stepped by core/bank_adamw.py). A forward pass carries rows in equal contiguous blocks, one block per *active* cell (the
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
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .bank_adamw import row_span
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
    """Shared by every MultiLoRALinear of one bank: which cells this forward carries."""
    active: list[int] = field(default_factory=list)
    # (start, stop) when the active cells are the bank slots start..stop-1 (train.py orders the bank so that they
    # always are): their adapters are then plain slices of the bank's parameters, no gather and no scatter-add
    span: tuple[int, int] | None = None
    # the same cells as an int64 tensor on the model's device (any other set: index_select), and as one-hot rows
    # float32 [len(active), cells in the bank] (under torch.compile, see MultiLoRALinear._adapters)
    index: torch.Tensor | None = None
    select: torch.Tensor | None = None
    autocast: bool = True              # over a bf16/fp16 base, run the adapter's matmuls in that dtype


class MultiLoRALinear(torch.nn.Module):
    """A frozen Linear plus K LoRA adapters (see the module docstring). Input [rows, width, in] with rows =
    len(routing.active) x block rows; output [rows, width, out] in the base's dtype.

    lora_A [K, r, in] and lora_B [K, out, r] are views into the bank's one [K, P] buffer (LoraBank.weights), so a
    backward pass accumulates one gradient per module whatever K is (core/bank_adamw.py steps all cells at once).
    Per forward: the base matmul, the dropout masked_fill, one bmm into rank r and one baddbmm that adds the
    adapter's output onto the base's; the LoRA scale alpha/r and dropout's 1/(1-p) are folded into B (a [K, out,
    r] product) instead of two passes over the activations: B(A(x*m/(1-p)))*s = (B*s/(1-p))(A(x*m))."""

    def __init__(self, base: torch.nn.Linear, lora_A: torch.nn.Parameter, lora_B: torch.nn.Parameter, scale: float,
                 dropout: float, offset: int, routing: _Routing):
        super().__init__()
        self.base = base
        self.scale, self.dropout, self.offset = scale, dropout, offset
        self.routing = routing
        self.k = lora_A.shape[0]
        # this module's columns of the micro-batch's dropout mask (True = dropped; its own tensor, set by
        # LoraBank.set_masks), not an offset into the whole mask: no per-module integer in the forward, so
        # torch.compile gives every layer the same graph (core/train.py)
        self.drop: torch.Tensor | None = None
        self.in_features = base.in_features
        # the dtype peft chose for the adapter (fp32 over a bf16 base: peft's autocast_adapter_dtype)
        self.lora_A, self.lora_B = lora_A, lora_B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if torch.compiler.is_compiling():
            # the cells of this forward from a tensor's shape, not len(active): a Python int would specialise the
            # graph on it, and a pass whose cells finish (25 -> 20 -> ... -> 5) recompiled every layer at each
            # step down (~15 s each on the H200, BENCHMARKS.md)
            k = self.routing.select.shape[0]
        else:
            k = len(self.routing.active)
            if x.shape[0] % k:
                raise ValueError(f"batch of {x.shape[0]} rows does not split into {k} cell blocks")
        a, b = self._adapters()                                                    # [k, r, in], [k, out, r]
        mask = self.drop if self.training else None                     # [tokens, in] (a packed micro-batch)
        b = b * (self.scale / (1.0 - self.dropout) if mask is not None else self.scale)
        # over a bf16 base the adapter's matmuls run in bf16 from the fp32 masters (the seed's autocast); else in
        # the adapter's dtype (peft without autocast: fp32 copies of the activations)
        cast = x.dtype if self.routing.autocast and x.dtype in (torch.bfloat16, torch.float16) else a.dtype
        a, b, xa = a.to(cast), b.to(cast), x.to(cast)
        if mask is not None:
            # masked_fill with a scalar reads two dense operands: the vectorised kernel (where(keep, x, 0.0) made
            # the 0.0 a broadcast operand: the generic kernel, ~1/5 of the bandwidth; BENCHMARKS.md)
            xa = xa.reshape(k, *mask.shape).masked_fill(mask, 0.0)
        h = torch.bmm(xa.reshape(k, -1, x.shape[-1]), a.transpose(1, 2))           # [k, block tokens, r]
        if cast == result.dtype:  # result + h B^T in one kernel
            return torch.baddbmm(result.view(k, -1, result.shape[-1]), h, b.transpose(1, 2)).view(result.shape)
        delta = torch.bmm(h, b.transpose(1, 2)).view(*result.shape[:-1], -1)
        return (result + delta).to(result.dtype)

    def _adapters(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The active cells' (A, B), as slices of the bank where the active cells are consecutive slots."""
        routing = self.routing
        if torch.compiler.is_compiling():
            # a one-hot weighted sum, exact (x1 and +0), fused by inductor into one reduction: no Python indices
            # in the graph, so one graph serves every set of cells; inductor's index_select computed a forward of
            # ONE cell out of a bank of two wrongly (float64 on the CPU: that cell stopped learning;
            # tests/core/test_train_group.py::test_compiled_layers_compute_what_eager_computes)
            sel = routing.select.to(self.lora_A.dtype)[:, :, None, None]            # [k, K, 1, 1]
            return (sel * self.lora_A).sum(1), (sel * self.lora_B).sum(1)
        if routing.span is not None:
            start, stop = routing.span
            if (start, stop) == (0, self.k):
                return self.lora_A, self.lora_B
            return self.lora_A[start:stop], self.lora_B[start:stop]
        return self.lora_A.index_select(0, routing.index), self.lora_B.index_select(0, routing.index)


def _set_module(root: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


class LoraBank:
    """K cells' LoRA adapters attached to `model` (a transformers causal LM). Use as a context manager: the base
    gets its original Linear modules back on exit, bit-identical (they are never modified).

    Storage: `weights` float [K, P] holds every trainable tensor of cell j in row j (P = one cell's LoRA
    parameters; `layout` names the slices), `grads` the matching gradient buffer. Each module's lora_A / lora_B
    Parameter is a [K, ...] view into `weights` whose .grad is the matching view into `grads`, so autograd
    accumulates straight into the buffer and the optimizer (core/bank_adamw.py) updates any set of cells with a
    handful of kernels: a step's kernel count no longer grows with K (it was ~2 x 210 parameters per cell on
    SmolLM2, each with its own gradient accumulation, clip and AdamW, BENCHMARKS.md)."""

    def __init__(self, model: torch.nn.Module, protocol: Protocol, seed: int, k: int):
        if k < 1:
            raise ValueError(f"a LoRA bank needs at least one cell, got k={k}")
        self.model, self.protocol, self.k = model, protocol, k
        self.device = next(model.parameters()).device
        self._indices: dict[tuple[int, ...], tuple] = {}
        self.routing = _Routing()
        init, self.scale = _peft_initialisation(model, protocol, seed)
        self.dropout = float(protocol.lora.dropout)
        self.originals = {name: model.get_submodule(name) for name in init}
        # layout: (tensor name, offset into a row, shape), in params() order (a checkpoint's order)
        self.layout: list[tuple[str, int, tuple[int, ...]]] = []
        offset = 0
        for name, (a, b) in init.items():
            for suffix, t in (("lora_A", a), ("lora_B", b)):
                self.layout.append((f"{name}.{suffix}", offset, tuple(t.shape)))
                offset += t.numel()
        dtype = next(iter(init.values()))[0].dtype  # peft's adapter dtype (fp32 over a bf16 base)
        self.weights = torch.empty((k, offset), dtype=dtype, device=self.device)
        self.grads = torch.zeros_like(self.weights)
        views = {}
        for (name, off, shape), t in zip(self.layout, (t for a_b in init.values() for t in a_b)):
            self.weights[:, off:off + t.numel()] = t.reshape(1, -1).to(self.device)  # every cell starts at peft's init
            p = torch.nn.Parameter(self.weights[:, off:off + t.numel()].view(k, *shape))
            p.grad = self.grads[:, off:off + t.numel()].view(k, *shape)
            views[name] = p
        self.modules: dict[str, MultiLoRALinear] = {}
        din = 0
        for name in init:
            base = self.originals[name]
            self.modules[name] = MultiLoRALinear(base, views[f"{name}.lora_A"], views[f"{name}.lora_B"], self.scale,
                                                 self.dropout, din, self.routing)
            din += base.in_features
        self.total_in = din  # dropout features per token: sum of every LoRA'd module's input width
        self.set_batch(range(k))
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
        self.set_masks(None)

    @contextlib.contextmanager
    def detached(self) -> Iterator[None]:
        """The base with its original modules for the duration (e.g. to save a PEFT adapter), then attached again."""
        self.__exit__(None, None, None)
        try:
            yield
        finally:
            self.__enter__()

    def params(self, j: int) -> dict[str, torch.Tensor]:
        """Cell j's trainable tensors by name (`<module>.lora_A`, `<module>.lora_B`): views into row j of `weights`,
        what a checkpoint holds (copying into them restores the cell)."""
        return {name: self.weights[j, off:off + math.prod(shape)].view(shape) for name, off, shape in self.layout}

    def zero_grad(self, rows: Sequence[int] | None = None) -> None:
        """Zero the gradients of cells `rows` (all if None), in place: the Parameters' .grad stay views into
        `grads`. Rows that took no part in a backward are zero already."""
        span = (0, self.k) if rows is None else row_span(rows)
        if span:
            self.grads[span[0]:span[1]].zero_()
        else:
            self.grads[torch.tensor(list(rows), device=self.grads.device)] = 0

    def set_batch(self, active: Sequence[int]) -> None:
        """Route the next forwards: row block c goes through cell active[c]'s adapter."""
        active = tuple(active)
        if not active:
            raise ValueError("a forward needs at least one active cell")
        if active not in self._indices:  # small host-to-device copies per distinct set, not per forward
            index = torch.tensor(active, dtype=torch.long, device=self.device)
            select = torch.zeros((len(active), self.k), dtype=torch.float32, device=self.device)
            select[torch.arange(len(active), device=self.device), index] = 1.0
            self._indices[active] = (index, select, row_span(active))
        self.routing.active = list(active)
        self.routing.index, self.routing.select, self.routing.span = self._indices[active]

    def set_masks(self, drop: torch.Tensor | None) -> None:
        """The dropout masks of the next forwards (as from drop_masks; None = no dropout, e.g. to free them).
        Each module gets its columns as a contiguous copy, once per micro-batch, so the masking kernel reads a dense
        mask: a strided view of the [tokens, total_in] mask sent it down its generic non-vectorised path (the
        largest elementwise kernel of a 5-cell step, 14%, BENCHMARKS.md). The copies cost one pass over the bool
        mask per micro-batch; the caller drops `drop` afterwards, so the mask is not held twice."""
        for mod in self.modules.values():
            mod.drop = None if drop is None else drop[..., mod.offset:mod.offset + mod.in_features].contiguous()

    def drop_masks(self, keys: Sequence[int], lengths: Sequence[int], device, total: int | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor | None:
        """Dropout masks of one packed micro-batch (core/packing.py): bool [total, total_in], True = dropped, the
        examples' rows one after the other (total defaults to sum(lengths); positions past it, alignment padding,
        drop nothing and are never supervised). Example r's lengths[r] rows are drawn from a generator seeded by
        keys[r] (see example_key), so they depend on nothing but the example and the epoch: not on the other rows,
        the micro-batch or the padding. out: a bool [total, total_in] tensor to write them into (a captured
        graph's input, core/train_graphs.py) instead of a new one. None when dropout is 0. Raises ValueError if
        total < sum(lengths) or `out` has another shape."""
        if self.dropout <= 0:
            return None
        total = sum(lengths) if total is None else total
        if total < sum(lengths):
            raise ValueError(f"drop_masks: total {total} < the examples' {sum(lengths)} tokens")
        if out is None:
            drop = torch.zeros((total, self.total_in), dtype=torch.bool, device=device)
        elif tuple(out.shape) != (total, self.total_in) or out.dtype != torch.bool:
            raise ValueError(f"drop_masks: out is {out.dtype} {tuple(out.shape)}; expected bool "
                             f"{(total, self.total_in)}")
        else:
            drop = out
            drop[sum(lengths):] = False  # padding rows: nothing dropped (the example rows are overwritten below)
        gen = torch.Generator(device=device)
        start = 0
        for key, n in zip(keys, lengths):
            gen.manual_seed(key)
            # dropped where u < p: the complement of the keep mask u >= p drawn before (same streams, same masks)
            torch.lt(torch.rand((n, self.total_in), generator=gen, device=device), self.dropout,
                     out=drop[start:start + n])
            start += n
        return drop

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
                for name, t in self.params(j).items():
                    module, _, which = name.rpartition(".")
                    getattr(mods[module], which)["default"].weight.copy_(t)
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
