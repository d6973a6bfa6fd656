"""Live progress lines (tqdm) for training and evaluation, on a terminal only.

When the output is not a terminal (CI, `| tee`, a log file) no bar is drawn and no escape sequence is written:
the periodic log lines and metrics.jsonl are the record there. While a bar is live, log lines go above it
(`StepProgress.write`), so the two never tear each other apart.
"""

from __future__ import annotations

import sys
from typing import Callable, Optional, TextIO

from tqdm import tqdm


def is_terminal(stream: Optional[TextIO] = None) -> bool:
    stream = stream or sys.stderr
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def duration(seconds: float) -> str:
    """A short human duration: 45s, 4m05s, 21h30m."""
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class StepProgress:
    """One live line for a training run: step/total (or seconds used/budget), loss, tokens/s and the time left."""

    def __init__(self, *, max_iters: int, time_budget: Optional[float], initial_step: int = 0,
                 initial_elapsed: float = 0.0, enabled: bool = True, stream: Optional[TextIO] = None):
        self.budget = time_budget
        stream = stream or sys.stderr
        common = dict(file=stream, disable=not enabled, dynamic_ncols=True, leave=False, mininterval=0.25)
        if time_budget is None:
            self.bar = tqdm(total=max_iters, initial=initial_step, unit="step", desc="train",
                            bar_format="{desc} |{bar}| {n_fmt}/{total_fmt} steps [{elapsed}<{remaining}]",
                            **common)
        else:
            self.bar = tqdm(total=round(time_budget), initial=round(initial_elapsed), unit="s", desc="train",
                            bar_format="{desc} |{bar}| {n_fmt}/{total_fmt} s", **common)

    def update(self, row: dict) -> None:
        """After a step, with its metrics row (step, loss, tokens_per_s, time_s)."""
        post = f"step {row['step']} | loss {row['loss']:.4f} | {row['tokens_per_s'] / 1000:.1f}k tok/s"
        if self.budget is None:
            self.bar.set_description_str(post, refresh=False)
            self.bar.update(row["step"] - self.bar.n)
        else:
            left = max(0.0, self.budget - row["time_s"])
            self.bar.set_description_str(f"{post} | {duration(left)} left", refresh=False)
            self.bar.update(min(round(row["time_s"]), self.bar.total) - self.bar.n)

    def write(self, log: Callable[[str], None], msg: str) -> None:
        """`log(msg)` printed above the live line."""
        if self.bar.disable:
            log(msg)
        else:
            with self.bar.external_write_mode():
                log(msg)

    def close(self) -> None:
        self.bar.close()


def eval_bar(total: int, desc: str, enabled: bool, stream: Optional[TextIO] = None) -> tqdm:
    """A transient bar for an evaluation of `total` batches (gone from the screen when done)."""
    return tqdm(total=total, desc=desc, unit="batch", leave=False, file=stream or sys.stderr, dynamic_ncols=True,
                disable=not enabled, mininterval=0.25)
