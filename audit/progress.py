"""Progress of a long audit: tqdm bars on a terminal, timestamped lines everywhere else (CI logs, files).

    progress = Progress()                  # bars when stderr is a terminal
    run_audit(cfg, run_dir, progress=progress)

On a terminal: one bar per target over its batches (with ETA), and under it one bar per attack over its steps
with the current ASR (the share of the batch already at the attacker's class). Off a terminal every message is
one line ``[HH:MM:SS] message`` and no attack reads its success rate back (no host sync per check).
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator, TextIO

from tqdm import tqdm


class Progress:
    """A callable taking messages (what the runner reports), plus the bars described in the module docstring."""

    def __init__(self, stream: TextIO | None = None, bars: bool | None = None, enabled: bool = True) -> None:
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.bars = bool(isatty()) if bars is None else bars
        self.enabled = enabled
        self._outer: tqdm | None = None
        self._inner: tqdm | None = None
        self._label = ""

    def __call__(self, msg: str) -> None:
        if not self.enabled:
            return
        if not self.bars:
            print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=self.stream, flush=True)
            return
        if self._outer is None:
            tqdm.write(msg, file=self.stream)
        else:
            self._label = msg.rsplit(": ", 1)[-1].split(" [")[0]  # "key: batch i/n: ADV²-GRAD [12s]" → "ADV²-GRAD"
            self._outer.set_postfix_str(self._label)

    @contextlib.contextmanager
    def target(self, key: str, batches: int) -> Iterator[None]:
        """The bar of one target over its batches (a no-op off a terminal)."""
        if not (self.enabled and self.bars):
            yield
            return
        self._outer = tqdm(total=batches, desc=key, unit="batch", file=self.stream, dynamic_ncols=True)
        try:
            yield
        finally:
            self._close_inner()
            self._outer.close()
            self._outer = None

    def advance(self) -> None:
        if self._outer is not None:
            self._outer.update(1)

    @property
    def steps(self):
        """The attack loop's callback ``(step, total, asr)``; None off a terminal (the loop then reads nothing)."""
        return self._steps if self.enabled and self.bars else None

    def _steps(self, step: int, total: int, asr=None) -> None:
        if self._inner is None or step <= self._inner.n or self._inner.total != total:
            self._close_inner()
            self._inner = tqdm(total=total, desc=f"  {self._label}", unit="step", leave=False, position=1,
                               file=self.stream, dynamic_ncols=True)
        self._inner.update(step - self._inner.n)
        if asr is not None:
            self._inner.set_postfix_str(f"ASR {float(asr):.0%}")
        if step >= total:
            self._close_inner()

    def _close_inner(self) -> None:
        if self._inner is not None:
            self._inner.close()
            self._inner = None
