"""`gptforge quickstart`: the whole pipeline with no network and no arguments.

Prepares the English reference documentation bundled with CPython at character level, trains the tiny
CPU preset on it (about two minutes on a laptop), prints samples and says where everything lives.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from gptforge.config import RunConfig, preset
from gptforge.errors import UserError


def quickstart(out: str | Path = "gptforge-quickstart", *, max_iters: int = 2000, device: str = "auto",
               overwrite: bool = False, log: Callable[[str], None] = print) -> Path:
    from gptforge.data.prepare import prepare
    from gptforge.sample import sample_checkpoint
    from gptforge.train import train

    out = Path(out)
    data_dir, run_dir = out / "data", out / "run"
    if (run_dir / "config.json").exists() and not overwrite:
        raise UserError(f"{out} already holds a quickstart run; sample from it with `gptforge sample {run_dir}` "
                        "or start again with --overwrite")
    if max_iters < 1:
        raise UserError(f"--max-iters must be at least 1, got {max_iters}")

    log(f"[1/3] preparing CPython's bundled documentation (pydoc) at character level into {data_dir}")
    prepare("pydoc", data_dir, tokenizer="char", overwrite=overwrite, progress=True)

    cfg = RunConfig.from_dict(preset("shakespeare-char-cpu"))
    cfg.data.dir = str(data_dir)
    cfg.train.max_iters = max_iters
    cfg.train.device = device
    cfg.train.log_interval = max(1, min(100, max_iters // 20))
    cfg.train.eval_interval = max(1, min(250, max_iters))
    cfg.optim.decay_iters = None  # decay over however many steps were asked for
    cfg.optim.warmup_iters = min(cfg.optim.warmup_iters, max_iters // 10)
    log(f"[2/3] training the shakespeare-char-cpu preset (4 layers, 128 wide) for {max_iters} steps into {run_dir}")
    result = train(cfg, run_dir, overwrite=overwrite, log=log)
    if result.interrupted:
        log(f"stopped early; continue with `gptforge train --resume {run_dir}`")
        return run_dir

    log("[3/3] two samples from the trained model:\n")
    sample_checkpoint(run_dir, "\n", num_samples=2, max_new_tokens=300, temperature=0.8, top_k=200,
                      device=device, out=sys.stdout)
    log(f"\nfinal val loss {result.val_loss:.4f}. The run lives in {run_dir}; next:\n"
        f"  gptforge sample {run_dir} --prompt 'The '\n"
        f"  gptforge eval {run_dir}")
    return run_dir
