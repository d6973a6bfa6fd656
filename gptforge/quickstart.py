"""`gptforge quickstart`: the whole pipeline with no network and no arguments.

Prepares the English reference documentation bundled with CPython (the topics of `help()`) at character
level, trains the `speedrun-cpu` recipe on it for a wall-clock budget (about a minute and a half in all on
a 2-core CPU), prints samples, the val loss and the commands to go on with.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional

from gptforge.config import QUICKSTART_TIME_BUDGET_S, RunConfig, preset
from gptforge.errors import UserError
from gptforge.data.prepare import prepare
from gptforge.infer.sample import sample_checkpoint
from gptforge.progress import is_terminal
from gptforge.train import train

RECIPE = "speedrun-cpu"


def quickstart(out: str | Path = "gptforge-quickstart", *, time_budget: Optional[float] = None,
               max_iters: Optional[int] = None, device: str = "auto", overwrite: bool = False,
               log: Callable[[str], None] = print) -> Path:
    """Prepare, train for `time_budget` seconds (or exactly `max_iters` steps instead), sample; returns the run dir."""

    out = Path(out)
    data_dir, run_dir = out / "data", out / "run"
    if (run_dir / "config.json").exists() and not overwrite:
        raise UserError(f"{out} already holds a quickstart run; sample from it with `gptforge sample {run_dir}` "
                        "or start again with --overwrite")
    cfg = _config(data_dir, time_budget, max_iters, device)
    length = f"{max_iters} steps" if max_iters is not None else f"{cfg.train.time_budget:g} s"

    log(f"gptforge quickstart: a small GPT learns to write like CPython's own documentation (the help() topics "
        f"bundled with every Python, no download), character by character, for {length}.")
    log(f"[1/3] preparing the documentation at character level into {data_dir}")
    prepare("pydoc", data_dir, tokenizer="char", overwrite=overwrite, progress=is_terminal())
    log(f"[2/3] training the {RECIPE} recipe (4 layers, 128 wide, RoPE, Muon) on it for {length} into {run_dir}")
    result = train(cfg, run_dir, overwrite=overwrite, log=log, verbosity=1, progress=True)
    if result.interrupted:
        log(f"stopped early; continue with `gptforge train --resume {run_dir}`")
        return run_dir
    _finish(run_dir, data_dir, result, device, log)
    return run_dir


def _config(data_dir: Path, time_budget: Optional[float], max_iters: Optional[int], device: str) -> RunConfig:
    """The speedrun recipe on the quickstart's data, for a time budget or (with max_iters) a step count."""
    if time_budget is not None and max_iters is not None:
        raise UserError("give --time-budget or --max-iters, not both (the lr decays over whichever is given)")
    if max_iters is not None and max_iters < 1:
        raise UserError(f"--max-iters must be at least 1, got {max_iters}")
    if time_budget is None and max_iters is None:
        time_budget = QUICKSTART_TIME_BUDGET_S
    if time_budget is not None and not time_budget > 0:
        raise UserError(f"--time-budget must be a number of seconds above 0, got {time_budget:g}")

    cfg = RunConfig.from_dict(preset(RECIPE))
    cfg.data.dir = str(data_dir)
    cfg.train.device = device
    cfg.train.full_val_at_end = True  # the reported val loss is the whole split, not a 10-batch estimate
    # Every 250 steps keeps a quiet machine's log to a handful of lines; the live line shows the rest.
    cfg.train.log_interval = cfg.train.eval_interval // 2
    cfg.train.time_budget = time_budget
    if max_iters is not None:
        cfg.train.max_iters = max_iters  # decay_iters is unset, so the lr decays over these steps
        cfg.optim.warmup_iters = min(cfg.optim.warmup_iters, max_iters // 10)
    return cfg


def _finish(run_dir: Path, data_dir: Path, result, device: str, log: Callable[[str], None]) -> None:
    """Two samples, the val loss, and what to run next."""

    log("[3/3] two samples from the trained model:\n")
    sample_checkpoint(run_dir, "\n", num_samples=2, max_new_tokens=200, temperature=0.8, top_k=200,
                      device=device, out=sys.stdout)
    if result.val_loss_full is not None:
        loss = f"val loss {result.val_loss_full:.4f} (the whole val split)"
    else:
        loss = f"val loss {result.val_loss:.4f}"
    log(f"\n{loss} after {result.step:,} steps in {result.elapsed_s:.0f} s. The run lives in {run_dir}; next:\n"
        f"  gptforge sample {run_dir} --prompt 'The '\n"
        f"  gptforge eval {run_dir}\n"
        f"  gptforge train --preset {RECIPE} --data {data_dir} --out runs/pydoc --train.time_budget 600"
        "   # longer, better")
