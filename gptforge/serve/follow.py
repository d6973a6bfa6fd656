"""What the server serves, and `--follow`: chatting with a run while it trains.

`Served` is what the server tells clients about its model: the name, the checkpoint's step, the run directory it
came from. `RunCurve` reads that run's metrics.jsonl as it grows (only the lines added since the last read), for
the loss curve the web page draws. `Follower` watches the run's latest/ (or best/) checkpoint and, when the
trainer writes a new one, loads it on its own thread and hands it to the batcher, which switches between
requests (`Batcher.swap`: a reply that has begun ends on the weights it began with).

Nothing here writes to the run directory or takes its lock: the trainer writes a checkpoint into a temporary
directory and renames it into place (gptforge.modelio.checkpoint), so a reader sees the old one or the new one.
A load that raced a rename (the step read before and after differ, or a file vanished mid-read) is dropped and
tried again at the next poll.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from gptforge.errors import UserError

log = logging.getLogger("gptforge.serve")
CURVE_POINTS = 500  # the most train-loss points /v1/run sends (every k-th step of a long run)


def run_dir_of(source) -> Optional[Path]:
    """The run directory `source` names (one with metrics.jsonl or a latest/ checkpoint), else None."""
    p = Path(str(source))
    if p.is_dir() and ((p / "metrics.jsonl").is_file() or (p / "latest" / "state.json").is_file()):
        return p.resolve()
    return None


def checkpoint_step(run_dir: Path, which: str) -> Optional[int]:
    """The step in run_dir/which/state.json, or None while it cannot be read (absent, or being replaced)."""
    try:
        return int(json.loads((run_dir / which / "state.json").read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass
class Served:
    """The model being served, as clients see it (read by the routes, written by the Follower's callback)."""
    name: str
    step: Optional[int] = None
    which: str = "latest"
    run_dir: Optional[Path] = None
    follow: bool = False
    draining: bool = False  # SIGTERM came: finishing the running requests, taking no new ones
    curve: Optional["RunCurve"] = None

    def run_info(self) -> dict[str, Any]:
        """The answer of GET /v1/run."""
        curve = self.curve.snapshot() if self.curve else None
        return {"model": self.name, "step": self.step, "which": self.which, "follow": self.follow,
                "training_step": self.curve.last_step if self.curve else None, "curve": curve}


@dataclass
class RunCurve:
    """The train and val losses of a run's metrics.jsonl, read incrementally (call `refresh` off the event loop)."""
    path: Path
    train: list[tuple[int, float]] = field(default_factory=list)
    val: list[tuple[int, float]] = field(default_factory=list)
    _offset: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def last_step(self) -> Optional[int]:
        steps = [p[-1][0] for p in (self.train, self.val) if p]
        return max(steps) if steps else None

    def refresh(self) -> None:
        """Read the whole lines added since the last call (a line the trainer is still writing waits)."""
        with self._lock:
            try:
                with open(self.path, "rb") as f:
                    f.seek(self._offset)
                    data = f.read()
            except OSError:
                return
            end = data.rfind(b"\n") + 1
            self._offset += end
            for line in data[:end].splitlines():
                self._take(line)

    def _take(self, line: bytes) -> None:
        try:
            row = json.loads(line)
            step = int(row["step"])
        except (ValueError, KeyError, TypeError):
            return  # not a metrics row: skipped, as a reader of a growing file must
        if isinstance(row.get("loss"), (int, float)):
            if self.train and step <= self.train[-1][0]:  # a resumed run rewrote these steps
                self.train = [p for p in self.train if p[0] < step]
            self.train.append((step, float(row["loss"])))
        if isinstance(row.get("val_loss"), (int, float)):
            self.val = [p for p in self.val if p[0] < step] + [(step, float(row["val_loss"]))]

    def snapshot(self) -> dict[str, list]:
        with self._lock:
            every = max(1, -(-len(self.train) // CURVE_POINTS))
            train = self.train[::every]
            if self.train and train[-1] != self.train[-1]:
                train.append(self.train[-1])
            return {"train": [list(p) for p in train], "val": [list(p) for p in self.val]}


class Follower:
    """Polls run_dir/which every `interval` seconds; a checkpoint with a new step is loaded by `load(run_dir)`
    (a `gptforge.modelio` Checkpoint) and handed to `swap(model, on_switch)`, which calls on_switch when it is
    the one decoding."""

    def __init__(self, served: Served, load: Callable[[], Any], swap: Callable, check: Callable[[Any], None],
                 interval: float = 2.0):
        self.served, self.load, self.swap, self.check, self.interval = served, load, swap, check, interval
        self.seen = served.step  # the newest step loaded (or handed over); never loaded twice
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gptforge-follow", daemon=True)

    def start(self) -> "Follower":
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception:  # a bad checkpoint must not stop the serving of the good one
                log.exception("following %s: loading the new checkpoint failed; still serving step %s",
                              self.served.run_dir, self.served.step)

    def poll(self) -> bool:
        """Load and hand over the checkpoint if its step is new; True when one was handed over."""
        served = self.served
        step = checkpoint_step(served.run_dir, served.which)
        if step is None or step == self.seen:
            return False
        try:
            ck = self.load()
        except (OSError, UserError) as e:  # the trainer replaced it while it was read: next poll
            log.info("following %s: step %s not readable yet (%s)", served.run_dir, step, e)
            return False
        if ck.state.get("step") != step or checkpoint_step(served.run_dir, served.which) != step:
            return False  # replaced between the reads: try again at the next poll
        self.seen = step  # before the check: a checkpoint it refuses is refused once, not at every poll
        self.check(ck)

        def switched(step=step) -> None:
            served.step = step
            log.info("following %s: now serving step %d", served.run_dir, step)
        self.swap(ck.model, switched)
        return True
