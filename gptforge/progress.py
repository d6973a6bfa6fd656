"""Progress of every long step, on stderr (stdout stays what a verb prints: its result, or --json's object).

`Progress` is the one mechanism for a step over a known amount of work (evaluation, prepare, HellaSwag, chat
answers, the harness): a tqdm bar on a terminal; off one (CI, `| tee`, a log file) a plain line every
EVERY_S seconds (`eval: 120/400 batches (30%), 1m10s, ~2m45s left`), none for a step shorter than that, and
never a carriage return or an escape sequence. Training's own live line is `StepProgress` (a terminal only:
off one, its periodic log lines and metrics.jsonl are the record). While a bar is live, log lines go above it
(`StepProgress.write`), so the two never tear each other apart.
"""

from __future__ import annotations

import sys
import time
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


EVERY_S = 30.0  # off a terminal, a line this often: a log shows the step is alive without filling up
CLOCK: Callable[[], float] = time.monotonic  # what a Progress times with unless it is given a clock
_PLURAL = {"batch": "batches", "ex": "examples", "conv": "conversations", "token": "tokens", "req": "requests"}


class Progress:
    """`total` units of work (None: unknown) under `desc`, on `stream` (stderr): a transient tqdm bar when it is a
    terminal, else a line every `every` seconds of `clock` (injectable: tests need no sleeping) and a last one
    at close once any was written. `enabled` False shows nothing. Used as tqdm is: update, set_postfix_str,
    a context manager. `unit_scale` shows counts as 12.3k (bytes as 11.8MB when the unit is "B"); `leave` keeps
    the finished bar on the screen."""

    def __init__(self, total: Optional[int], desc: str, *, unit: str = "batch", enabled: bool = True,
                 stream: Optional[TextIO] = None, initial: int = 0, unit_scale: bool = False,
                 leave: bool = False, clock: Optional[Callable[[], float]] = None, every: float = EVERY_S):
        self.stream = stream or sys.stderr
        self.total, self.desc, self.unit, self.unit_scale = total, desc, unit, unit_scale
        self.n = self.n0 = initial
        self.clock = clock or CLOCK  # looked up now: a test replaces CLOCK for the steps it drives from outside
        self.every, self.postfix, self.lines, self.shown = every, "", 0, initial
        self.t0 = self.last = self.clock()
        self.lines_on = enabled and not is_terminal(self.stream)
        self.bar = None
        if enabled and not self.lines_on:
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit_scale,
                            unit_divisor=1024 if unit == "B" else 1000, leave=leave, file=self.stream,
                            dynamic_ncols=True, mininterval=0.25)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.lines_on:
            now = self.clock()
            if now - self.last >= self.every:
                self._line(now)

    def set_postfix_str(self, s: str, refresh: bool = False) -> None:
        """What follows the count (running figures: documents, accuracy); on a line, after a `|`."""
        self.postfix = s
        if self.bar is not None:
            self.bar.set_postfix_str(s, refresh=refresh)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.lines_on and self.lines and self.shown != self.n:  # a log that said the step was under way
            self._line(self.clock())  # says it ended, and when
        self.lines_on = False  # closed twice (a with block around an explicit close): still one last line

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _count(self, n: float) -> str:
        if self.unit == "B":
            return tqdm.format_sizeof(n, "B", 1024)
        return tqdm.format_sizeof(n) if self.unit_scale and n >= 1000 else f"{int(n):,}"

    def _line(self, now: float) -> None:
        self.last = now
        elapsed, units = now - self.t0, "" if self.unit == "B" else f" {_PLURAL.get(self.unit, self.unit + 's')}"
        if self.total:
            line = f"{self.desc}: {self._count(self.n)}/{self._count(self.total)}{units} ({self.n / self.total:.0%})"
        else:
            line = f"{self.desc}: {self._count(self.n)}{units}"
        line += f", {duration(elapsed)}"
        done = self.n - self.n0  # the rate of this session's work (a resumed prepare starts at `initial`)
        if self.total and done > 0 and self.n < self.total:
            line += f", ~{duration(elapsed * (self.total - self.n) / done)} left"
        self.lines, self.shown = self.lines + 1, self.n
        print(line + (f" | {self.postfix}" if self.postfix else ""), file=self.stream, flush=True)


def eval_bar(total: int, desc: str, enabled: bool, stream: Optional[TextIO] = None) -> Progress:
    """The progress of an evaluation of `total` batches."""
    return Progress(total, desc, unit="batch", enabled=enabled, stream=stream)
