"""`gptforge report RUN_DIR`: a plot and a short markdown summary of a training run.

Owns reading a run's metrics.jsonl back (see train.py for the rows it writes), the summary figures
(parameters, tokens, throughput, MFU, best and final losses, HellaSwag) and the two files it writes:
RUN_DIR/report.png (matplotlib, optional: `pip install matplotlib`) and RUN_DIR/report.md.

metrics.jsonl holds three kinds of rows, told apart by their keys:
  train rows      step, loss, lr, grad_norm, dt_ms, tokens_per_s, mfu, time_s
  eval rows       step, train_loss, val_loss, time_s, tokens
  HellaSwag rows  step, hellaswag_acc, hellaswag_acc_norm (alone or merged into an eval row)
A resumed run can log a step again; within each kind the last occurrence of a step wins, because it
belongs to the timeline that continued.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from gptforge.config import GPTConfig, RunConfig
from gptforge.errors import UserError, one_line
from gptforge.files import atomic_path, atomic_write

METRICS, CONFIG, PNG, MARKDOWN = "metrics.jsonl", "config.json", "report.png", "report.md"
NO_PLOT_HINT = "No plot: matplotlib is not installed; `pip install matplotlib` and run `gptforge report` again."


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass
class Metrics:
    """The rows of a metrics.jsonl, one per step and kind, sorted by step."""

    train: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    hellaswag: list[dict[str, Any]] = field(default_factory=list)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def read_metrics(path: str | os.PathLike) -> Metrics:
    """Parse metrics.jsonl; lines cut short by a kill are skipped, repeated steps keep their last row."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"no {METRICS} in {path.parent}; is it a run directory written by `gptforge train`?") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {one_line(e)}") from None
    kinds: dict[str, dict[int, dict[str, Any]]] = {"train": {}, "evals": {}, "hellaswag": {}}
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not isinstance(row, dict) or not _is_number(row.get("step")):
            continue
        step = int(row["step"])
        if _is_number(row.get("loss")):
            kinds["train"][step] = row
        if _is_number(row.get("val_loss")):
            kinds["evals"][step] = row
        if _is_number(row.get("hellaswag_acc")) or _is_number(row.get("hellaswag_acc_norm")):
            kinds["hellaswag"][step] = row
    if not any(kinds.values()):
        raise UserError(f"{path} holds no training or evaluation rows yet; nothing to report")
    return Metrics(**{k: [rows[s] for s in sorted(rows)] for k, rows in kinds.items()})


def read_config(run_dir: Path) -> Optional[dict[str, Any]]:
    """RUN_DIR/config.json as a dict, or None when it is missing or unreadable (the report still works)."""
    try:
        cfg = json.loads((run_dir / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None


# ---------------------------------------------------------------------------------------------
# Figures


def count_params(model_cfg: dict[str, Any]) -> Optional[dict[str, int]]:
    """Parameter counts of the model a config describes, built on the meta device (no memory, no init cost)."""
    try:
        # here: a report reads JSON, and only this count needs torch (seconds of start-up)
        import torch

        from gptforge.model import GPT

        with torch.device("meta"):
            model = GPT(GPTConfig(**model_cfg))
        return {"total": model.num_params(non_embedding=False), "non_embedding": model.num_params()}
    except Exception:  # an old or hand-edited config: the report is still useful without the count
        return None


def tokens_per_step(metrics: Metrics, cfg: Optional[dict[str, Any]]) -> Optional[float]:
    """Tokens per optimizer step: measured from eval rows (they log both), else from the config (1 process)."""
    for row in reversed(metrics.evals):
        if row.get("step") and _is_number(row.get("tokens")):
            return row["tokens"] / row["step"]
    if cfg is not None:
        try:
            t, m = cfg["train"], cfg["model"]
            return float(t.get("total_batch_size") or t["batch_size"] * m["block_size"])
        except (KeyError, TypeError):
            pass
    return None


def _median(rows: list[dict[str, Any]], key: str) -> Optional[float]:
    values = [r[key] for r in rows if _is_number(r.get(key)) and math.isfinite(r[key])]
    return statistics.median(values) if values else None


def summarize(metrics: Metrics, cfg: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The report's numbers, as a JSON-able dict (also what `gptforge report --json` prints)."""
    s: dict[str, Any] = {}
    all_rows = metrics.train + metrics.evals + metrics.hellaswag
    s["steps"] = max(int(r["step"]) for r in all_rows)
    s["max_iters"] = (cfg or {}).get("train", {}).get("max_iters")
    tps = tokens_per_step(metrics, cfg)
    s["tokens_per_step"] = tps
    s["tokens_seen"] = round(s["steps"] * tps) if tps else None
    times = [r["time_s"] for r in all_rows if _is_number(r.get("time_s"))]
    s["wall_time_s"] = max(times) if times else None
    s["train_steps_logged"] = len(metrics.train)
    s["median_tokens_per_s"] = _median(metrics.train, "tokens_per_s")
    s["median_ms_per_step"] = _median(metrics.train, "dt_ms")
    s["median_mfu"] = _median(metrics.train, "mfu")
    s["last_train_loss"] = metrics.train[-1]["loss"] if metrics.train else None
    finite = [r for r in metrics.evals if math.isfinite(r["val_loss"])]
    if finite:
        best = min(finite, key=lambda r: r["val_loss"])  # the first step wins a tie, as best/ keeps it
        s["best_val_loss"], s["best_val_step"] = best["val_loss"], int(best["step"])
    else:
        s["best_val_loss"] = s["best_val_step"] = None
    last = metrics.evals[-1] if metrics.evals else {}
    s["final_val_loss"], s["final_eval_step"] = last.get("val_loss"), last.get("step")
    s["final_eval_train_loss"] = last.get("train_loss")
    if metrics.hellaswag:
        h = metrics.hellaswag[-1]
        s["hellaswag"] = {"step": h["step"], "acc": h.get("hellaswag_acc"), "acc_norm": h.get("hellaswag_acc_norm"),
                          "n": h.get("hellaswag_n")}
        best_h = max(metrics.hellaswag, key=lambda r: r.get("hellaswag_acc_norm", -1.0))
        s["hellaswag"]["best_acc_norm"] = best_h.get("hellaswag_acc_norm")
        s["hellaswag"]["best_acc_norm_step"] = best_h["step"]
    s["params"] = count_params(cfg["model"]) if cfg and isinstance(cfg.get("model"), dict) else None
    return s


# ---------------------------------------------------------------------------------------------
# Writing


def _schedule(cfg: dict) -> str:
    """The schedule the run really followed (decay_iters left unset follows max_iters), and its warning if any."""
    from gptforge.optim import describe_schedule  # here: gptforge.optim imports torch, which a report needs not

    try:
        c = RunConfig.from_dict(cfg)
    except UserError:
        o = cfg.get("optim", {})
        return f"lr {o.get('lr')} -> {o.get('min_lr')} ({o.get('schedule')})"
    text, warning = describe_schedule(c.optim, c.train.max_iters, c.train.time_budget)
    return text + (f" (note: {warning})" if warning else "")


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average: the raw train loss of one step is too noisy to read a trend from."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot(metrics: Metrics, path: Path, tokens_per_step_: Optional[float], title: str) -> bool:
    """Write the figure to `path` (PNG); False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: never open a window, work on headless machines
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = 2 + bool(metrics.hellaswag)
    fig, axes = plt.subplots(1, panels, figsize=(6.2 * panels, 4.6), squeeze=False)
    axes = axes[0]

    ax = axes[0]
    if metrics.train:
        steps = [r["step"] for r in metrics.train]
        losses = [r["loss"] for r in metrics.train]
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8)
        ax.plot(steps, _smooth(losses, max(1, len(losses) // 50)), color="tab:blue", label="train loss (smoothed)")
    if metrics.evals:
        steps = [r["step"] for r in metrics.evals]
        ax.plot(steps, [r["val_loss"] for r in metrics.evals], "o-", color="tab:orange", markersize=3,
                label="val loss")
        if any(_is_number(r.get("train_loss")) for r in metrics.evals):
            ax.plot(steps, [r.get("train_loss", math.nan) for r in metrics.evals], "s--", color="tab:green",
                    markersize=3, linewidth=1, label="train loss (eval)")
        finite = [r for r in metrics.evals if math.isfinite(r["val_loss"])]
        if finite:
            best = min(finite, key=lambda r: r["val_loss"])
            ax.plot([best["step"]], [best["val_loss"]], "*", color="tab:red", markersize=12,
                    label=f"best val {best['val_loss']:.4f} @ {best['step']}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if tokens_per_step_:
        # the same curves against tokens seen: a second x axis, since tokens = step x tokens per step
        top = ax.secondary_xaxis("top", functions=(lambda s: s * tokens_per_step_, lambda t: t / tokens_per_step_))
        top.set_xlabel("tokens")

    ax = axes[1]
    if metrics.train:
        steps = [r["step"] for r in metrics.train]
        ax.plot(steps, [r.get("lr", math.nan) for r in metrics.train], color="tab:purple")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title("learning rate")
    ax.grid(alpha=0.3)

    if metrics.hellaswag:
        ax = axes[2]
        steps = [r["step"] for r in metrics.hellaswag]
        for key, style in (("hellaswag_acc", "o-"), ("hellaswag_acc_norm", "s-")):
            ax.plot(steps, [r.get(key, math.nan) for r in metrics.hellaswag], style, markersize=3,
                    label=key.replace("hellaswag_", ""))
        ax.axhline(0.25, color="gray", linestyle=":", label="chance (0.25)")
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy")
        ax.set_title("HellaSwag")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    fig.suptitle(title)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:  # a report being rewritten is never seen half-written
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)
    return True


def _si(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _duration(seconds: float) -> str:
    h, rem = divmod(round(seconds), 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def render_markdown(s: dict[str, Any], cfg: Optional[dict[str, Any]], title: str, png: Optional[str]) -> str:
    """report.md's text from `summarize`'s dict."""
    out = [f"# Run report: {title}", ""]
    out += [f"![loss curves]({png})" if png else NO_PLOT_HINT, ""]

    out += ["## Model", ""]
    m = (cfg or {}).get("model")
    if isinstance(m, dict):
        m = {k: json.dumps(v) if isinstance(v, bool) or v is None else v for k, v in m.items()}  # true, not True
        kv = m.get("n_kv_head") if m.get("n_kv_head") != "null" else m.get("n_head")
        out.append(f"- shape: {m.get('n_layer')} layers, {m.get('n_head')} heads ({kv} key/value), "
                   f"{m.get('n_embd')} wide, block {m.get('block_size')}, vocabulary {m.get('vocab_size')}")
        out.append(f"- architecture: pos {m.get('pos')}, norm {m.get('norm')}, mlp {m.get('mlp')}, "
                   f"qk_norm {m.get('qk_norm')}, bias {m.get('bias')}, tied embeddings {m.get('tie_embeddings')}, "
                   f"dropout {m.get('dropout')}")
        p = s.get("params")
        if p:
            out.append(f"- parameters: {_si(p['total'])} ({p['total']:,}); {_si(p['non_embedding'])} "
                       "without position embeddings")
        t = cfg.get("train", {})
        o = cfg.get("optim", {})
        total = t.get("total_batch_size")
        total = f"{total:,} tokens" if isinstance(total, int) else "one micro-batch"
        out.append(f"- training: batch {t.get('batch_size')} x block {m.get('block_size')}, total batch "
                   f"{total}, dtype {t.get('dtype')}")
        out.append(f"- schedule: {_schedule(cfg)}")
        if cfg.get("data", {}).get("dir"):
            out.append(f"- data: `{cfg['data']['dir']}`")
    else:
        out.append(f"- no readable {CONFIG} in the run directory")
    out.append("")

    out += ["## Training", ""]
    of = f" of {s['max_iters']:,}" if s.get("max_iters") else ""
    out.append(f"- steps: {s['steps']:,}{of}")
    if s.get("tokens_seen") is not None:
        out.append(f"- tokens seen: {_si(s['tokens_seen'])} ({s['tokens_seen']:,}; "
                   f"{s['tokens_per_step']:,.0f} per step)")
    if s.get("wall_time_s") is not None:
        out.append(f"- wall time: {_duration(s['wall_time_s'])}")
    if s.get("median_tokens_per_s") is not None:
        out.append(f"- throughput (median over {s['train_steps_logged']:,} steps): "
                   f"{s['median_tokens_per_s']:,.0f} tokens/s, {s['median_ms_per_step']:.1f} ms/step")
    if s.get("median_mfu") is not None:
        out.append(f"- MFU (median): {100 * s['median_mfu']:.1f}%")
    out.append("")

    out += ["## Loss", ""]
    if s.get("best_val_loss") is not None:
        out.append(f"- best val loss: {s['best_val_loss']:.4f} at step {s['best_val_step']:,}")
    if s.get("final_val_loss") is not None:
        tr = s.get("final_eval_train_loss")
        tr_text = f" (train loss {tr:.4f})" if _is_number(tr) else ""
        out.append(f"- final val loss: {s['final_val_loss']:.4f} at step {s['final_eval_step']:,}{tr_text}")
    if s.get("last_train_loss") is not None:
        out.append(f"- last step's train loss: {s['last_train_loss']:.4f}")
    if s.get("best_val_loss") is None and s.get("last_train_loss") is None:
        out.append("- no losses logged yet")
    out.append("")

    h = s.get("hellaswag")
    if h:
        out += ["## HellaSwag", ""]
        n = f" on {h['n']:,} examples" if h.get("n") else ""
        fmt = lambda v: f"{v:.4f}" if _is_number(v) else "n/a"
        out.append(f"- at step {h['step']:,}{n}: acc {fmt(h['acc'])}, acc_norm {fmt(h['acc_norm'])} (chance 0.25)")
        out.append(f"- best acc_norm: {fmt(h['best_acc_norm'])} at step {h['best_acc_norm_step']:,}")
        out.append("")
    return "\n".join(out)


def write_report(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Write RUN_DIR/report.md and (with matplotlib) RUN_DIR/report.png.

    Returns {"markdown": path, "png": path or None, "summary": the numbers}.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory; pass a run directory written by `gptforge train`")
    metrics = read_metrics(run_dir / METRICS)
    cfg = read_config(run_dir)
    summary = summarize(metrics, cfg)
    title = run_dir.resolve().name
    png_path = run_dir / PNG
    try:
        has_png = plot(metrics, png_path, summary["tokens_per_step"], title)
        md_path = run_dir / MARKDOWN
        text = render_markdown(summary, cfg, title, PNG if has_png else None)
        atomic_write(md_path, text + "\n")
    except OSError as e:
        raise UserError(f"cannot write the report into {run_dir}: {e.strerror or e}") from None
    return {"markdown": str(md_path), "png": str(png_path) if has_png else None, "summary": summary}
