"""A training step's micro-batches, run as CUDA graphs where they can be: what makes a small model's step GPU-bound.

Why: on the H200 a SmolLM2-135M step is host-bound. One cell, compiled layers: ~177 ms a step for ~6,000 tokens,
the GPU busy a fraction of it (BENCHMARKS.md, issue 18): the host launches each step's ~1,500 kernels (30 layers,
forward and backward, the LoRA bank, dropout, loss) one by one. A CUDA graph launches them all at once.

How (`MicroBatches`, used by core/train.py for every micro-batch, graphs or not):
- Static shapes. A micro-batch is packed into a `packing.StaticShape`: its tokens rounded up to `bucket_tokens`
  (< 1/16 padding from 2,048 tokens on, < 128 tokens below) but never past the step's token cap (the memory
  plan's bound, batch_plan.tokens_per_forward), supervised positions to a multiple of SUPERVISED_MULTIPLE, a fixed number of attention
  segments (empty ones at the end) and a fixed width (the longest example of the data) for the whole pass.
  Padding tokens sit in segments of their own, drop nothing, are never supervised: the loss and gradients are
  those of the exact micro-batch (tests/core/test_train_graphs.py, float64).
- One graph per (shape, cells of the forward), holding the forward, the loss and the backward. Its inputs are
  the static batch's two tensors and the dropout-mask buffer, filled in place before each replay; its output
  is the loss sums [cells], overwritten by each replay; the backward adds into the LoRA bank's gradient buffer
  in place (autograd adds into an existing .grad), which the optimizer then reads as before.
- A shape captured before is reused for a smaller micro-batch when it pads at most GRAPH_REUSE_SLACK more:
  fewer captures (each costs about one step's host time).
- The pass's first graph runs once eagerly before its capture (torch's CUDA graph notes: lazy initialisation,
  and torch.compile's compiling, outside the capture); that run is the micro-batch's real work. Later shapes and
  sets of cells are captured, then replayed (the replay is the work): compiled layers see the cells of a forward
  as a symbolic size, so a new set compiles nothing, except the step between one cell and several (torch.compile
  specialises size 1), which runs eagerly first too.
- Three checks, each a replay against an eager run of the same micro-batch: loss sums and the gradient it adds,
  per cell and separately for the LoRA A and B halves. (1) The pass's first capture, replayed on its eager run's
  inputs (a capture that dropped or misrecorded work). (2) "new inputs": the first replay of a graph, on a
  micro-batch other than the one it was captured on, before any replay's result is used (a graph reading an
  input that was replaced instead of filled in place). (3) "adapters trained": the first replay once every
  cell's LoRA B has left 0 (at peft's initialisation B = 0, so every A gradient is 0 and checks (1)-(2) cannot
  see the A half). The eager run is the micro-batch's work. Checks (2)-(3) run where that eager run fits in free
  memory beside the graphs' pool, else they are skipped and the record says so. Graphs are off for the rest of the pass
  when a check or a capture fails, with the reason in the run record (`cuda_graphs`); the micro-batch is never
  trained twice. Out-of-memory is raised, not recorded.
- Memory: all graphs of the pass share one memory pool (their intermediates: graphs never run at once), so the
  pool holds the largest forward's activations once; they stay until the pass ends (a pool whose graphs were
  deleted failed an allocator assert at the next capture, torch 2.11, see generation/static_decode.py). An eager
  run beside a filled pool would hold a second forward's activations: where one would be needed (one cell after
  several), graphs stop for the pass instead (measured: a 25-cell pass whose every set of cells began with an
  eager run beside the previous set's pool ran out of memory on the H200).
- The whole pass runs on one side stream (`pass_stream`): capture needs a stream of its own, and autograd's
  gradient accumulation then runs on the stream the graphs run on.
Off CUDA, graphs=True replays an `_EmulatedGraph` (the tests: the same static-input protocol, without CUDA).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from . import packing
from .batch_plan import BACKWARD_MARGIN, memory_budget
from .compiled_layers import AUTO_MAX_PARAMETERS, parameter_count
from .lora_bank import LoraBank
from .models import error_gist
from .packing import PackedBatch, StaticShape

SUPERVISED_MULTIPLE = 32     # supervised slots per shape: a paper example has 1-4, a 16-example micro-batch ~16-30
GRAPH_REUSE_SLACK = 0.125    # a captured shape serves a micro-batch of at least 1 / (1 + this) of its tokens
# a captured graph's first replay against its eager run (loss sums and the gradient it adds), relative: the same
# computation, but not bit for bit in 16-bit on the GPU (the order of atomic adds in flash attention's backward,
# cuBLAS's choices inside a capture): measured on the H200, SmolLM2 shapes in bf16: loss equal, gradient 0.2% off
# (0.0352 of 16.5); a capture that missed an input or an op is off by O(1). fp32/float64 models: the tight one
CHECK_RTOL_16BIT = 2e-2
CHECK_RTOL = 1e-4


def bucket_tokens(n: int) -> int:
    """Token slots of a new static shape for a micro-batch of n tokens: n rounded up to a multiple of
    2^(bit_length(n) - 5), at least 128 (so < 1/16 padding, ~12 shapes for a paper pass of one cell).

    >>> [bucket_tokens(n) for n in (1, 129, 5_900, 11_000)]
    [128, 256, 6144, 11264]
    """
    if n < 1:
        raise ValueError(f"bucket_tokens: n={n}; expected >= 1")
    step = max(128, 1 << max(0, n.bit_length() - 5))
    return -(-n // step) * step


def graphs_reason(device: torch.device, model, gradient_checkpointing: bool, setting: str) -> str | None:
    """Why a pass does NOT run its micro-batches as CUDA graphs, or None when it does. setting (ZLT_TRAIN_CUDA_GRAPHS):
    `auto` = on CUDA for models under compiled_layers.AUTO_MAX_PARAMETERS (host-bound; a 7B step is GPU-bound and
    its capture would hold a second copy of its activations while the first graph is built); `off`."""
    if setting == "off":
        return "ZLT_TRAIN_CUDA_GRAPHS=off"
    if device.type != "cuda":
        return f"device {device.type}"
    if gradient_checkpointing:
        # its recomputation reads the CUDA RNG state (preserve_rng_state), which a capture refuses
        return "gradient checkpointing"
    if parameter_count(model) >= AUTO_MAX_PARAMETERS:
        return f"model of >= {AUTO_MAX_PARAMETERS:,} parameters (GPU-bound)"
    return None


@dataclass
class GraphStats:
    """What the pass's graphs did (the run record's `cuda_graphs`): used = graphs on for the pass; reason = why
    not (from the start, or since a failed capture or check); captured graphs, replays, eager runs (micro-batches
    not replayed: plain passes, first runs before a capture, checks), build_s = host seconds spent building and
    checking graphs (captures, the first eager run, the checks' eager runs and replays), static shapes made, token
    slots run against the examples' tokens (the padding's cost), the checks made ("first capture: ok", ...)."""
    used: bool = False
    reason: str | None = None
    captured: int = 0
    replays: int = 0
    eager_runs: int = 0
    build_s: float = 0.0
    token_slots: int = 0
    tokens: int = 0
    shapes: int = 0
    checks: list = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["build_s"] = round(self.build_s, 3)
        return d


class _CudaGraph:
    """`body` captured on the current (non-default) stream into memory pool `pool`; `replay` runs it and returns its
    output tensor (overwritten by each replay)."""

    def __init__(self, body: Callable[[], torch.Tensor], pool):
        self.graph = torch.cuda.CUDAGraph()
        self.graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        try:
            self.out = body()
        except BaseException as e:
            # an error inside the capture invalidates it, and capture_end then raises "operation failed due to a
            # previous error during capture": the body's error is the one to report; capture_end's rides on it
            try:
                self.graph.capture_end()
            except Exception as end_error:
                e.add_note(f"capture_end then: {type(end_error).__name__}: {str(end_error).splitlines()[0][:200]}")
            raise
        self.graph.capture_end()

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.out


class _EmulatedGraph:
    """What a CUDA graph does, on any device: nothing runs at capture; every replay runs `body` (which reads the
    static inputs it was built on, as the graph would) and writes into one output tensor. A caller that handed
    the graph new tensors instead of filling the static ones gets stale results here too."""

    def __init__(self, body: Callable[[], torch.Tensor], pool):
        self.body, self.out = body, None

    def replay(self) -> torch.Tensor:
        out = self.body()
        if self.out is None:
            self.out = out.clone()
        else:
            self.out.copy_(out)
        return self.out


def plain_micro_batch(bank: LoraBank, examples: Sequence, keys: Sequence[int], pad_id: int, device,
                      multiple: int = 1, step_supervised: int = 0) -> PackedBatch:
    """`examples` packed into one row of exactly their tokens (rounded up to `multiple`; packing.collate_packed),
    their dropout masks (keys: lora_bank.example_key) set on the bank for the next forwards."""
    batch = packing.collate_packed(examples, pad_id, device, multiple, step_supervised=step_supervised)
    bank.set_masks(bank.drop_masks(keys, batch.lengths, device, batch.tokens))
    return batch


class MicroBatches:
    """Forward + backward of a pass's packed micro-batches, one optimizer step's worth at a time:
    `begin_step(cells)` starts an optimizer step that trains bank slots `cells`; `load(examples, keys,
    step_supervised, cap)` packs a micro-batch and draws its dropout masks (keys: the examples' dropout streams,
    lora_bank.example_key; cap: the step's token cap per micro-batch, 0 = none); `run(cells)` adds the gradient of
    its summed loss / step_supervised for those slots to the bank's gradient buffer and returns the loss sums
    float32 [len(cells)]; `release()` frees the micro-batch. graphs=False: plain forwards over exactly the
    micro-batch (the model's own shapes, no padding); graphs=True: static shapes replayed as CUDA graphs (see the
    module docstring), or `_EmulatedGraph`s off CUDA. lengths: the examples' token counts of the pass (they size
    the static shapes and the dropout-mask buffer, bool [tokens, bank.total_in], allocated here: create this
    before reading free memory for the plan); effective_batch: the most examples a micro-batch holds;
    activation_bytes_per_token: of one cell (batch_plan), to size check (2)'s eager run against free memory;
    loss_sums(model, batch, k, full_logits): the loss (core/train.block_loss_sums). The model must be in
    packing.packed_attention mode with `bank` attached for load and run. run raises RuntimeError for cells outside
    the step's; load raises ValueError (packing.collate_packed) on examples without tokens."""

    def __init__(self, model, bank: LoraBank, pad_id: int, device: torch.device, *, loss_sums: Callable,
                 full_logits: bool, multiple: int, graphs: bool, lengths: Sequence[int], effective_batch: int,
                 activation_bytes_per_token: int = 0, reason: str | None = None,
                 progress: Callable[[str], None] | None = None):
        self.model, self.bank, self.pad_id, self.device = model, bank, pad_id, device
        self.progress = progress
        self.full_logits, self.multiple = full_logits, multiple
        self._loss_sums = loss_sums
        self.stats = GraphStats(used=graphs, reason=None if graphs else (reason or "off"))
        self.batch: PackedBatch | None = None
        self.shape: StaticShape | None = None
        self._graph_cls = _CudaGraph if device.type == "cuda" else _EmulatedGraph
        self._statics: dict[StaticShape, PackedBatch] = {}
        self._graphs: dict[tuple, object] = {}
        self._warmed: set[bool] = set()
        self._cells: tuple[int, ...] | None = None
        self._pool = None
        self._checked = False          # check (1) done
        self._live_checked: set[str] = set()  # checks (2) and (3) done or skipped
        self._steps = 0
        self.activation_bytes_per_token = activation_bytes_per_token
        self._a_cols: torch.Tensor | None = None
        self.mask_buffer = None
        if graphs:
            longest = -(-max(lengths) // multiple) * multiple
            eff = min(effective_batch, len(lengths))
            largest = sum(sorted(lengths)[-eff:])  # a micro-batch never holds more than one step's examples
            self.token_slots = bucket_tokens(largest)
            # padding per micro-batch <= max(bucket step, reuse slack) tokens, in segments of <= `longest` tokens
            most_pad = max(self.token_slots - largest, 128 + largest // 16, int(GRAPH_REUSE_SLACK * largest) + 1)
            self.segments = eff + 1 + -(-most_pad // longest)
            self.width = longest
            if bank.dropout > 0:
                self.mask_buffer = torch.zeros((self.token_slots, bank.total_in), dtype=torch.bool, device=device)

    # -- per micro-batch ------------------------------------------------------------------------------------
    def load(self, examples: Sequence, keys: Sequence[int], step_supervised: int, cap: int = 0) -> PackedBatch:
        """Pack `examples` and draw their dropout masks; returns the batch (its `tokens` include any padding, never
        past max(cap, the examples' tokens) when cap > 0)."""
        lengths = [len(e.input_ids) for e in examples]
        self.stats.tokens += sum(lengths)
        if not self.stats.used:
            self.shape, self.mask_buffer = None, None
            self.batch = plain_micro_batch(self.bank, examples, keys, self.pad_id, self.device, self.multiple,
                                           step_supervised)
        else:
            supervised = sum(packing.supervised_count(e) for e in examples)
            self.shape = self._shape_for(sum(lengths), supervised, cap)
            self.batch = packing.collate_packed(examples, self.pad_id, self.device, shape=self.shape,
                                                step_supervised=step_supervised)
            if self.mask_buffer is not None:
                self.bank.drop_masks(keys, lengths, self.device, self.shape.tokens,
                                     out=self.mask_buffer[:self.shape.tokens])
        self.stats.token_slots += self.batch.tokens
        return self.batch

    def run(self, cells: Sequence[int]) -> torch.Tensor:
        """Forward + backward of the loaded micro-batch for bank slots `cells`; loss sums float32 [len(cells)]."""
        cells = tuple(cells)
        if self.stats.used:
            if self._cells is not None and not set(cells) <= set(self._cells):
                raise RuntimeError(f"cells {cells} are not all among the step's {self._cells} (begin_step)")
            return self._run_graph(cells)
        if self.shape is not None:  # graphs were given up since this micro-batch was loaded on its static shape
            return self._run_static_plainly(cells)
        self.stats.eager_runs += 1
        return self._forward_backward(self.batch, cells)

    def release(self) -> None:
        """Free the loaded micro-batch (its masks on the bank: set again by the next load)."""
        self.bank.set_masks(None)
        self.batch = None

    def begin_step(self, cells: Sequence[int]) -> None:
        """A new optimizer step, training bank slots `cells` (its forwards run subsets of them)."""
        self._cells = tuple(cells)
        self._steps += 1

    def close(self) -> None:
        self._drop_graphs()
        self.mask_buffer = None

    # -- internals ------------------------------------------------------------------------------------------
    def _shape_for(self, tokens: int, supervised: int, cap: int = 0) -> StaticShape:
        """A captured shape that fits and pads at most GRAPH_REUSE_SLACK more, else a new bucket; never more token
        slots than max(cap, tokens) when cap > 0 (the memory plan's bound)."""
        limit = max(tokens, cap) if cap else self.token_slots
        fits = [s for s in self._statics if tokens <= s.tokens <= min(limit, (1 + GRAPH_REUSE_SLACK) * tokens)
                and supervised <= s.supervised]
        if fits:
            return min(fits, key=lambda s: (s.tokens, s.supervised))
        shape = StaticShape(min(bucket_tokens(tokens), limit, max(tokens, self.token_slots)),
                            max(SUPERVISED_MULTIPLE, -(-supervised // SUPERVISED_MULTIPLE) * SUPERVISED_MULTIPLE),
                            self.segments, self.width)
        if shape.tokens > self.token_slots:
            raise RuntimeError(f"a micro-batch of {tokens} tokens is over the pass's static bound "
                               f"{self.token_slots} (MicroBatches sizing)")
        return shape

    def _forward_backward(self, batch: PackedBatch, cells: tuple[int, ...]) -> torch.Tensor:
        """Plain forward + backward (what a graph holds); the bank's masks must be set for `batch`."""
        self.bank.set_batch(cells)
        sums = self._loss_sums(self.model, batch, len(cells), self.full_logits)
        (sums.sum() / batch.step_supervised.squeeze(0)).backward()
        return sums.detach()

    def _body(self, static: PackedBatch, cells: tuple[int, ...]) -> Callable[[], torch.Tensor]:
        masks = None if self.mask_buffer is None else self.mask_buffer[:static.tokens]

        def body() -> torch.Tensor:
            self.bank.set_masks(masks)  # each module's contiguous copy of its columns: inside the graph
            try:
                return self._forward_backward(static, cells)
            finally:
                self.bank.set_masks(None)
        return body

    def _run_graph(self, cells: tuple[int, ...]) -> torch.Tensor:
        """Replay the graph of (shape, cells), or capture it first (see the module docstring). A failed capture
        or check turns graphs off for the pass (recorded) and the micro-batch still runs once."""
        shape = self.shape
        static = self._statics.get(shape)
        if static is None:
            static = self._statics[shape] = self.batch.empty_like()
            self.stats.shapes += 1
        static.load_(self.batch)
        graph = self._graphs.get((shape, cells))
        body = self._body(static, cells)  # a closure over the static inputs: what captures and checks run
        if graph is not None:
            if "new inputs" not in self._live_checked:
                return self._live_check(graph, body, shape, cells, "new inputs")
            if "adapters trained" not in self._live_checked and self._adapters_moved(cells):
                return self._live_check(graph, body, shape, cells, "adapters trained")
            self.stats.replays += 1
            return graph.replay().clone()
        t = time.perf_counter()
        out, before = None, None
        compile_class = len(cells) == 1  # torch.compile specialises size 1: one cell is a graph of its own
        if compile_class not in self._warmed:
            if self._graphs:  # an eager run now would sit beside the pool's activations (module docstring)
                self.give_up(f"a forward of {len(cells)} cell(s) after forwards of "
                             f"{'one cell' if not compile_class else 'several'} would run eagerly beside the graphs' "
                             "memory")
                return self._run_static_plainly(cells)
            # the pass's first graph: the eager run is this micro-batch's work; then capture (nothing runs)
            if not self._checked:
                before = self.bank.grads.clone()
            out = body()
            self.stats.eager_runs += 1
            self._warmed.add(compile_class)
            if self.device.type == "cuda":  # the eager run's blocks back to the driver, for the graph's pool
                torch.cuda.empty_cache()
        stage = "capture"
        self.bank.set_batch(cells)  # a new set's routing tensors are built (host-to-device copies) before the capture
        try:
            if self._pool is None and self.device.type == "cuda":
                self._pool = torch.cuda.graph_pool_handle()
            graph = self._graph_cls(body, self._pool)
            self.stats.captured += 1
            if before is not None:
                stage, self._checked = "check (first capture)", True
                self._compare(graph, out, before, cells)
                self.stats.checks.append(f"first capture ({shape.tokens} tokens x {len(cells)} cell(s)): ok")
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:  # recorded (run record, progress), not swallowed: the pass goes on without graphs
            self.give_up(f"{stage} failed at {shape.tokens} tokens x {len(cells)} cell(s): {type(e).__name__}: {error_gist(e)}")
            return out if out is not None else self._run_static_plainly(cells)
        finally:
            self.stats.build_s += time.perf_counter() - t
        self._graphs[(shape, cells)] = graph
        if out is None:
            out = graph.replay().clone()
            self.stats.replays += 1
        return out

    def _live_check(self, graph, body: Callable[[], torch.Tensor], shape: StaticShape, cells: tuple[int, ...],
                    name: str) -> torch.Tensor:
        """Check (2) or (3): this micro-batch eagerly (its real work), then the graph replayed on it, compared;
        skipped (and said so) where the eager run would not fit beside the graphs' pool."""
        self._live_checked.add(name)
        where = f"{shape.tokens} tokens x {len(cells)} cell(s), step {self._steps}"
        need = int(BACKWARD_MARGIN * self.activation_bytes_per_token * shape.tokens * len(cells))
        if self.device.type == "cuda" and memory_budget(self.device, 0) < need:
            self.stats.checks.append(f"{name} ({where}): skipped, its eager run needs {need / 2**30:.1f} GiB "
                                     "beside the graphs' pool")
            self.stats.replays += 1
            return graph.replay().clone()
        t = time.perf_counter()
        before = self.bank.grads.clone()
        out = body()
        self.stats.eager_runs += 1
        try:
            self._compare(graph, out, before, cells)
            self.stats.checks.append(f"{name} ({where}): ok")
        except RuntimeError as e:
            self.give_up(f"check ({name}) failed at {where}: {type(e).__name__}: {error_gist(e)}")
        finally:
            self.stats.build_s += time.perf_counter() - t
        return out

    def _compare(self, graph, eager_out: torch.Tensor, grads_before: torch.Tensor, cells: tuple[int, ...]) -> None:
        """Replay `graph` (its static inputs hold the micro-batch the eager run just ran) and compare: the loss
        sums, and per cell the gradient added to its LoRA A and to its LoRA B parameters, each within rtol of the
        eager run's (an exact 0 must stay 0: at initialisation every A gradient is 0). RuntimeError naming the
        first difference. The bank's gradients are put back as the eager run left them."""
        after_eager = self.bank.grads.clone()
        dtype = next(self.model.parameters()).dtype
        rtol = CHECK_RTOL_16BIT if dtype in (torch.bfloat16, torch.float16) else CHECK_RTOL
        try:
            replayed = graph.replay()
            if not torch.allclose(replayed, eager_out, rtol=rtol, atol=0.0):
                raise RuntimeError(f"replay gave loss {replayed.tolist()} against the eager run's "
                                   f"{eager_out.tolist()}")
            rows = list(cells)
            added_eager = (after_eager - grads_before)[rows]
            added_graph = (self.bank.grads - after_eager)[rows]
            for half, cols in (("A", self._a_columns()), ("B", ~self._a_columns())):
                scale = torch.linalg.vector_norm(added_eager[:, cols], dim=1)
                diff = torch.linalg.vector_norm(added_graph[:, cols] - added_eager[:, cols], dim=1)
                bad = (diff > rtol * scale).nonzero().flatten().tolist()
                if bad:
                    r = bad[0]
                    raise RuntimeError(f"replay added a LoRA {half} gradient {float(diff[r]):.3g} off of "
                                       f"{float(scale[r]):.3g} for bank slot {rows[r]}")
        finally:
            self.bank.grads.copy_(after_eager)

    def _adapters_moved(self, cells: tuple[int, ...]) -> bool:
        """Whether every cell's LoRA B has left 0 (peft's initialisation; the warmup's first step has LR 0), so
        that the A gradients are live. A host read, once per replay until check (3) has run."""
        return bool((self.bank.weights[list(cells)][:, ~self._a_columns()] != 0).any(dim=1).all())

    def _a_columns(self) -> torch.Tensor:
        """bool [P]: the columns of a bank row that hold LoRA A parameters (LoraBank.layout)."""
        if self._a_cols is None:
            cols = torch.zeros(self.bank.grads.shape[1], dtype=torch.bool)
            for name, off, shape in self.bank.layout:
                if name.endswith("lora_A"):
                    cols[off:off + math.prod(shape)] = True
            self._a_cols = cols.to(self.bank.grads.device)
        return self._a_cols

    def _run_static_plainly(self, cells: tuple[int, ...]) -> torch.Tensor:
        """The loaded static (padded) micro-batch without a graph: after graphs were given up."""
        self.stats.eager_runs += 1
        return self._body(self.batch, cells)()

    def give_up(self, reason: str) -> None:
        """Graphs off for the rest of the pass (recorded in `stats`, and said through `progress`)."""
        if not self.stats.used:
            return
        self.stats.used, self.stats.reason = False, reason
        if self.progress is not None:
            self.progress(f"CUDA graphs off for the rest of this pass: {reason}")
        self._drop_graphs()
        self._statics.clear()

    def _drop_graphs(self) -> None:
        self._graphs.clear()
        self._warmed.clear()
        self._pool = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


@contextlib.contextmanager
def pass_stream(device: torch.device, graphs: bool) -> Iterator[None]:
    """The pass on a side stream of its own when it uses CUDA graphs (see the module docstring); nothing else
    otherwise. On exit the default stream waits for it."""
    if not graphs or device.type != "cuda":
        yield
        return
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    try:
        with torch.cuda.stream(side):
            yield
    finally:
        torch.cuda.current_stream(device).wait_stream(side)
