"""`gptforge quickstart`: the whole pipeline with no network and no arguments.

Prepares the English reference documentation bundled with CPython (the topics of `help()`) at character
level, trains the `speedrun-cpu` recipe on it for a wall-clock budget (about a minute and a half in all on
a 2-core CPU), prints samples, the val loss and the commands to go on with.

`quickstart_chat` (`gptforge quickstart --chat`) is the chat pipeline the same way: synthetic instruction
conversations (gptforge.data.synthetic_chat) prepared with the chat template, a tiny model trained on them
from scratch for a fixed number of steps (SFT: the loss on the assistant's tokens), the held-out exact match
per skill, example exchanges, and the commands to chat with it and serve it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional

from gptforge.config import QUICKSTART_CHAT_MAX_ITERS, QUICKSTART_TIME_BUDGET_S, RunConfig, preset
from gptforge.errors import UserError
from gptforge.data import synthetic_chat
from gptforge.data.prepare import prepare
from gptforge.infer.sample import sample_checkpoint
from gptforge.train import train

RECIPE = "speedrun-cpu"


def quickstart(out: str | Path = "gptforge-quickstart", *, time_budget: Optional[float] = None,
               max_iters: Optional[int] = None, device: str = "auto", overwrite: bool = False,
               log: Callable[[str], None] = print) -> Path:
    """Prepare, train for `time_budget` seconds (or exactly `max_iters` steps instead), sample; returns the run dir."""

    out = Path(out)
    data_dir, run_dir = out / "data", out / "run"
    _check_fresh(out, run_dir, overwrite, f"sample from it with `gptforge sample {run_dir}`")
    cfg = _config(data_dir, time_budget, max_iters, device)
    length = f"{max_iters} steps" if max_iters is not None else f"{cfg.train.time_budget:g} s"

    log(f"gptforge quickstart: a small GPT learns to write like CPython's own documentation (the help() topics "
        f"bundled with every Python, no download), character by character, for {length}.")
    log(f"[1/3] preparing the documentation at character level into {data_dir}")
    prepare("pydoc", data_dir, tokenizer="char", overwrite=overwrite, progress=True)
    log(f"[2/3] training the {RECIPE} recipe ({_shape(cfg)}, RoPE, Muon) on it for {length} into {run_dir}")
    result = train(cfg, run_dir, overwrite=overwrite, log=log, verbosity=1, progress=True)
    if result.interrupted:
        log(f"stopped early; continue with `gptforge train --resume {run_dir}`")
        return run_dir
    _finish(run_dir, data_dir, result, device, log)
    return run_dir


def _check_fresh(out: Path, run_dir: Path, overwrite: bool, go_on: str) -> None:
    if (run_dir / "config.json").exists() and not overwrite:
        raise UserError(f"{out} already holds a quickstart run; {go_on} or start again with --overwrite")


def _shape(cfg: RunConfig) -> str:
    """The model's shape as announced, read from the config so the words cannot drift from the recipe."""
    m = cfg.model
    return f"{m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide"


def _check_length(time_budget: Optional[float], max_iters: Optional[int]) -> None:
    if time_budget is not None and max_iters is not None:
        raise UserError("give --time-budget or --max-iters, not both (the lr decays over whichever is given)")
    if max_iters is not None and max_iters < 1:
        raise UserError(f"--max-iters must be at least 1, got {max_iters}")
    if time_budget is not None and not time_budget > 0:
        raise UserError(f"--time-budget must be a number of seconds above 0, got {time_budget:g}")


def _config(data_dir: Path, time_budget: Optional[float], max_iters: Optional[int], device: str) -> RunConfig:
    """The speedrun recipe on the quickstart's data, for a time budget or (with max_iters) a step count."""
    _check_length(time_budget, max_iters)
    if time_budget is None and max_iters is None:
        time_budget = QUICKSTART_TIME_BUDGET_S

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


# ----------------------------------------------------------------------------------------------
# quickstart --chat

CHAT_SEED = 0  # the synthetic set's: the same conversations on every machine
# A tiny model from scratch: benchmarks/chat_sft.py's shape (2 layers x 4 heads x 64 wide, RoPE, Muon), its
# context the longest synthetic conversation, so none is ever cut. Rows of 16 x 128 tokens are chat_sft's
# tokens a step (32 x 64); AdamW's lr is 1e-2, not chat_sft's 3e-3: 0.80 held-out exact match against 0.72
# after 1,500 of 3,000 steps (the speedrun-cpu block: 0.26 against 0.37 after 500).
CHAT_RECIPE: dict = {
    "model": {"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": synthetic_chat.MAX_TOKENS, "pos": "rope",
              "dropout": 0.0},
    "optim": {"optimizer": "muon", "lr": 1e-2, "min_lr": 1e-3, "warmup_iters": 50},
    "train": {"batch_size": 16, "eval_iters": 5, "eval_at_start": False, "log_interval": 100, "dtype": "float32",
              "compile": False, "full_val_at_end": True},
}


def quickstart_chat(out: str | Path = "gptforge-quickstart-chat", *, time_budget: Optional[float] = None,
                    max_iters: Optional[int] = None, device: str = "auto", overwrite: bool = False,
                    log: Callable[[str], None] = print) -> Path:
    """Write the synthetic conversations, prepare them, train `max_iters` steps (or for `time_budget` seconds),
    score the held-out conversations and show some; returns the run dir."""

    out = Path(out)
    data_dir, run_dir = out / "data", out / "run"
    files = out / "train.jsonl", out / "heldout.jsonl"
    _check_fresh(out, run_dir, overwrite, f"chat with it: `gptforge chat {run_dir}`")
    if not overwrite and (old := next((f for f in files if f.exists()), None)):
        raise UserError(f"{old} exists (from an earlier quickstart --chat); start again with --overwrite")
    cfg = _chat_config(data_dir, time_budget, max_iters, device)
    length = f"{cfg.train.max_iters:,} steps" if time_budget is None else f"{time_budget:g} s"

    log("gptforge quickstart --chat: a tiny GPT learns to follow instructions from scratch, on conversations "
        "this command makes up (arithmetic, word games, a table of facts, greetings, follow-up questions; no "
        f"download), for {length}.")
    chats = synthetic_chat.generate(CHAT_SEED, synthetic_chat.N_TRAIN)
    heldout = [c for convs in chats.heldout.values() for c in convs]
    out.mkdir(parents=True, exist_ok=True)
    synthetic_chat.write_jsonl(files[0], chats.train)
    synthetic_chat.write_jsonl(files[1], heldout)
    log(f"[1/4] {len(chats.train):,} training conversations in {files[0]}, {len(heldout)} held out in {files[1]}; "
        f"preparing them with the chat template at character level into {data_dir}")
    prepare(str(files[0]), data_dir, tokenizer="char", chat="messages", val_fraction=0.02, overwrite=overwrite,
            progress=True)
    log(f"[2/4] training a new model ({_shape(cfg)}, context {cfg.model.block_size}, RoPE, Muon) on the "
        f"assistant's turns for {length} into {run_dir}")
    result = train(cfg, run_dir, overwrite=overwrite, log=log, verbosity=1, progress=True)
    if result.interrupted:
        log(f"stopped early; continue with `gptforge train --resume {run_dir}`")
        return run_dir
    _chat_finish(run_dir, files[1], chats.heldout, result, device, log)
    return run_dir


def _chat_config(data_dir: Path, time_budget: Optional[float], max_iters: Optional[int], device: str) -> RunConfig:
    """CHAT_RECIPE on the prepared conversations, for `max_iters` steps (default QUICKSTART_CHAT_MAX_ITERS) or
    for a time budget."""
    _check_length(time_budget, max_iters)
    cfg = RunConfig.from_dict(CHAT_RECIPE)
    cfg.data.dir = str(data_dir)
    cfg.train.device = device
    cfg.train.time_budget = time_budget
    if max_iters is None:  # with a time budget max_iters is only a ceiling: the lr decays over the seconds
        max_iters = QUICKSTART_CHAT_MAX_ITERS if time_budget is None else 10**6
    cfg.train.max_iters = max_iters
    cfg.train.eval_interval = max(1, min(cfg.train.max_iters, 500))  # a checkpoint and a val loss now and then
    cfg.optim.warmup_iters = min(cfg.optim.warmup_iters, cfg.train.max_iters // 10)
    return cfg


def _chat_finish(run_dir: Path, heldout_file: Path, heldout: dict[str, list], result, device: str,
                 log: Callable[[str], None]) -> None:
    """The held-out exact match, overall and per skill, a few exchanges, and what to run next."""
    from gptforge.device import pick_device, pick_dtype
    from gptforge.evaluate import evaluate_chat
    from gptforge.modelio.load import load

    log("[3/4] held-out exact match (greedy answers to questions never asked in training):")
    dev = pick_device(device)
    ck = load(run_dir, dev)
    dtype = pick_dtype(ck.config.train.dtype, dev)
    scores = {skill: evaluate_chat(ck.model, ck.tokenizer, convs, batch_size=64, device=dev, dtype=dtype)
              for skill, convs in heldout.items()}
    for skill, s in scores.items():
        log(f"  {skill:11s} {s['exact_match']:6.1%}  ({s['matched']}/{s['conversations']})")
    matched, total = (sum(s[k] for s in scores.values()) for k in ("matched", "conversations"))
    # a reply that runs on past its answer is wrong however it starts: this says whether the model stops itself
    unfinished = sum(s["unfinished"] for s in scores.values())
    ended = ("every reply ended by itself" if not unfinished else "1 reply did not end by itself" if unfinished == 1
             else f"{unfinished} replies did not end by themselves")
    steps = f"{result.step:,} step{'' if result.step == 1 else 's'}"
    log(f"held-out exact match {matched / total:.1%} ({matched}/{total}; {ended}) after {steps} in "
        f"{result.elapsed_s:.0f} s")
    log("[4/4] some of them:")
    for skill, s in scores.items():
        ex, conv = s["examples"][0], heldout[skill][0]
        earlier = "".join(f"  you: {m['content']}\n" if m["role"] == "user" else f"  bot: {m['content']}\n"
                          for m in conv[:-2])
        verdict = ("right" if ex["answer"].strip() == ex["reference"].strip() else f"wrong: {ex['reference']!r}")
        verdict += "" if ex["finished"] else "; it did not stop"
        log(f"{earlier}  you: {ex['prompt']}\n  bot: {ex['answer']}    ({verdict})\n")
    log(f"The run lives in {run_dir}; next:\n"
        f"  gptforge chat {run_dir}                      # talk to it (try: hi, what is 3 + 4?, and times 2?)\n"
        f"  gptforge serve {run_dir}                     # the same over HTTP and a web page (needs gptforge[serve])\n"
        f"  gptforge eval {run_dir} --task chat --file {heldout_file}")
