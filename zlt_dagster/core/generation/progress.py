"""Progress of one long generation or scoring call (issue 17, item 4): tokens, tokens/s, sequences done of the
total and an ETA, logged at most every `interval_s`, plus the final figures a step stores in stats.json (and so in
the materialization metadata).

The backends feed it; it never touches a tensor, so reporting costs no host synchronisation of its own: a
backend reports figures it already has on the host (the fast loop every `check_every` steps, where it syncs
anyway to find finished rows; the plain `generate()` path and ARC after each batch)."""
from __future__ import annotations

import time
from typing import Callable

PROGRESS_INTERVAL_S = 15.0  # the "at least every ~15 s": often enough to see a run move, not a log flood


def _duration(seconds: float) -> str:
    """12 s, 3 min 05 s, 1 h 02 min: what a person reads in a log line."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class GenerationProgress:
    """Counts what a backend reports and logs a line at most every `interval_s` seconds (0 = on every report).

    log: where lines go (Dagster's context.log.info in an asset, which `zlt run` prints; `print` elsewhere).
    label: what runs, e.g. "on-policy data", "completions lr=0.0001_ep=3", "ARC base".
    total: the sequences (or ARC continuations) this call will finish; the ETA is time per finished sequence x
        those left, so it is rough while few are done (rows of one batch finish in the order of their lengths).
    unit / verb: "sequences" / "generated" for generation; ARC says "continuations" / "scored".
    batch_source: how the batch size handed to the backend was chosen ("protocol", "cpu default"), reported
        unless the backend sizes the batch itself (`set_batch` with a source).
    clock: seconds, monotonic; injectable for tests.

    What a backend calls (Generator.generate's `progress`):
      set_batch(rows, source=None) once it knows its rows per batch (source: how it sized them, when it did);
      advance(tokens=, sequences=) as tokens are made and sequences end, at least once per batch: increments.
    The caller ends with `finish()`, which returns the summary (see `summary`)."""

    def __init__(self, log: Callable[[str], None], label: str, total: int, *, unit: str = "sequences",
                 verb: str = "generated", interval_s: float = PROGRESS_INTERVAL_S,
                 batch_source: str = "requested", clock: Callable[[], float] = time.monotonic):
        if total < 0:
            raise ValueError(f"progress total={total}; expected >= 0 {unit}")
        if interval_s < 0:
            raise ValueError(f"progress interval_s={interval_s}; expected >= 0 seconds")
        self.log, self.label, self.total, self.unit, self.verb = log, label, total, unit, verb
        self.interval_s, self.clock = interval_s, clock
        self.tokens = 0
        self.sequences = 0
        self.batch_size = 0
        self.batch_source = batch_source
        self.start = self.last_log = clock()
        self.end: float | None = None

    def set_batch(self, rows: int, source: str | None = None) -> None:
        """The backend's rows per batch (the largest, if it is called per batch); `source` says how the backend
        sized them (None: the batch size it was given). Logged once, when first known."""
        first = self.batch_size == 0
        self.batch_size = max(self.batch_size, rows)
        if source is not None:
            self.batch_source = source
        if first:
            self.log(f"{self.label}: {self.total:,} {self.unit}, batch {rows:,} ({self.batch_source})")

    def advance(self, tokens: int = 0, sequences: int = 0) -> None:
        """Add `tokens` made and `sequences` finished since the last report; log if `interval_s` has passed."""
        self.tokens += tokens
        self.sequences += sequences
        now = self.clock()
        if now - self.last_log >= self.interval_s:
            self.last_log = now
            self.log(self.line(now))

    def line(self, now: float | None = None) -> str:
        """e.g. 'completions lr=0.0001_ep=3: 1,100/2,200 sequences, 352,000 tokens generated, 14,089 tok/s,
        25 s elapsed, ETA 25 s' (ETA '?' until a sequence has finished)."""
        now = self.clock() if now is None else now
        elapsed = now - self.start
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        if self.sequences and self.total:
            eta = _duration(elapsed / self.sequences * max(0, self.total - self.sequences))
        else:
            eta = "?"
        return (f"{self.label}: {self.sequences:,}/{self.total:,} {self.unit}, {self.tokens:,} tokens {self.verb}, "
                f"{rate:,.0f} tok/s, {_duration(elapsed)} elapsed, ETA {eta}")

    def finish(self, tokens: int | None = None, sequences: int | None = None) -> dict:
        """Stop the clock, log the final line and return `summary()`. `tokens` / `sequences`, when given, are
        the exact figures from the result (e.g. the sum of Completion.n_new_tokens) and replace the counts: a
        backend that reports only per batch, or not at all, still gets right final figures."""
        if tokens is not None:
            self.tokens = tokens
        if sequences is not None:
            self.sequences = sequences
        self.end = self.clock()
        s = self.summary()
        self.log(f"{self.label}: done, {s['sequences']:,} {self.unit}, {s['tokens']:,} tokens {self.verb} in "
                 f"{_duration(s['wall_s'])} ({s['tokens_per_s']:,.0f} tok/s), batch {s['batch_size']:,} "
                 f"({s['batch_size_source']})")
        return s

    def summary(self) -> dict:
        """{label, sequences, tokens, wall_s, tokens_per_s, batch_size, batch_size_source}: wall_s from
        construction to `finish()` (or now), tokens_per_s = tokens / wall_s (0.0 for no time)."""
        wall = (self.end if self.end is not None else self.clock()) - self.start
        return {"label": self.label, "sequences": self.sequences, "tokens": self.tokens, "wall_s": round(wall, 2),
                "tokens_per_s": round(self.tokens / wall, 1) if wall > 0 else 0.0,
                "batch_size": self.batch_size, "batch_size_source": self.batch_source}
