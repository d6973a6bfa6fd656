"""Configuration: one dataclass per concern, the named presets, and JSON load/save.

A run is fully described by a `RunConfig` (model, optim, train, data sections). The CLI derives
`--section.field VALUE` flags from these dataclasses; the resolved config is written into the run
directory and into every checkpoint, so `eval` and `sample` rebuild everything from a checkpoint alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from gptforge.errors import UserError


class ConfigError(UserError):
    """A configuration mistake: a bad value, an unknown preset, inconsistent fields."""


@dataclass
class GPTConfig:
    """Model shape and architecture options (the `model` section)."""

    block_size: int = 1024
    """context length in tokens"""
    vocab_size: Optional[int] = None
    """vocabulary size after padding; null = the data's tokenizer size rounded up to a multiple of 64"""
    n_layer: int = 12
    """number of transformer blocks"""
    n_head: int = 12
    """number of query heads"""
    n_kv_head: Optional[int] = None
    """number of key/value heads: null = n_head (multi-head), 1 = multi-query, between = grouped-query"""
    n_embd: int = 768
    """width of the residual stream"""
    mlp_hidden: Optional[int] = None
    """MLP hidden width; null = 4*n_embd for gelu, 8/3*n_embd rounded up to a multiple of 64 for swiglu"""
    dropout: float = 0.0
    """dropout on attention weights and residual branches (0 for pretraining)"""
    bias: bool = True
    """biases in Linear layers and LayerNorm (GPT-2 has them)"""
    pos: Literal["learned", "rope"] = "learned"
    """position encoding: learned absolute embeddings (GPT-2) or rotary (RoPE)"""
    rope_theta: float = 10000.0
    """RoPE base frequency"""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """normalisation layer"""
    norm_eps: float = 1e-5
    """epsilon of the normalisation layers"""
    mlp: Literal["gelu", "gelu_tanh", "swiglu", "relu2"] = "gelu"
    """MLP type: GELU (exact, 2.5x faster than tanh on CPU), gelu_tanh (GPT-2's own approximation), gated SwiGLU, or relu2 (squared ReLU: cheap, and learns fast)"""
    qk_norm: bool = False
    """RMS-normalise queries and keys per head before attention"""
    tie_embeddings: bool = True
    """share the token embedding matrix with the output head"""
    zero_init_proj: bool = False
    """initialise the projections into the residual stream (attn and mlp c_proj) to zero, so every block starts as the identity"""
    attention: Literal["sdpa", "manual"] = "sdpa"
    """scaled_dot_product_attention (fast, flash on GPU) or the step-by-step version for learners"""

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.mlp_hidden is None:
            if self.mlp == "swiglu":
                self.mlp_hidden = 64 * math.ceil(8 * self.n_embd / 3 / 64)
            else:
                self.mlp_hidden = 4 * self.n_embd
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def validate(self) -> None:
        for name in ("block_size", "n_layer", "n_head", "n_embd", "n_kv_head", "mlp_hidden"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be at least 1, got {getattr(self, name)}")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ConfigError(f"model.vocab_size must be at least 1, got {self.vocab_size}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({self.n_kv_head})")
        if self.pos == "rope" and self.head_dim % 2:
            raise ConfigError(f"rope needs an even head size, got n_embd/n_head = {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule (the `optim` section)."""

    lr: float = 6e-4
    """peak learning rate"""
    min_lr: float = 6e-5
    """learning rate at the end of the decay (the floor)"""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """after warmup: cosine or linear decay to min_lr, or constant then a linear cooldown to min_lr"""
    warmup_iters: int = 700
    """linear warmup steps"""
    warmup_frac: Optional[float] = None
    """warmup as a fraction of train.max_iters (e.g. 0.07); overrides warmup_iters when set"""
    decay_iters: Optional[int] = None
    """step at which the decay reaches min_lr; null = train.max_iters"""
    cooldown_frac: float = 0.2
    """for the constant schedule: the final fraction of steps that decays linearly to min_lr"""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices and embeddings only"""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """clip the global gradient norm to this value; 0 disables"""
    fused: Optional[bool] = None
    """fused AdamW kernel; null = use it where the device supports it (CUDA)"""
    optimizer: Literal["adamw", "muon"] = "adamw"
    """adamw for every parameter, or muon: Muon (orthogonalised momentum) for the matrices inside the blocks, AdamW (at lr) for embeddings, output head, gains and biases"""
    muon_lr: float = 0.02
    """peak learning rate of the Muon matrices (follows the same schedule as lr)"""
    muon_momentum: float = 0.95
    """Muon's (Nesterov) momentum"""
    muon_ns_steps: int = 5
    """Newton-Schulz iterations that orthogonalise each Muon update (fewer is cheaper and rougher)"""


@dataclass
class TrainConfig:
    """The training loop (the `train` section)."""

    max_iters: int = 5000
    """number of optimizer steps (with time_budget: the most it may take)"""
    time_budget: Optional[float] = None
    """train for this many seconds of wall-clock time (evaluations included) instead of max_iters steps; the LR schedule is laid out over the time, then a final eval and checkpoint"""
    stop_after: Optional[int] = None
    """end this invocation after this many steps, with a checkpoint; --resume continues on the same schedule (for job time limits)"""
    batch_size: int = 12
    """micro-batch size in sequences, per process"""
    total_batch_size: Optional[int] = None
    """tokens per optimizer step across all processes (reached by gradient accumulation); null = one micro-batch"""
    eval_interval: int = 250
    """evaluate, log and checkpoint every this many steps"""
    eval_iters: int = 20
    """batches per split in the periodic evaluation (a fixed token budget)"""
    full_val_at_end: bool = False
    """at the end, also measure the loss over the whole val split in non-overlapping windows of block_size (val_loss_full)"""
    log_interval: int = 1
    """print a log line every this many steps (every step is written to metrics.jsonl)"""
    seed: int = 1337
    device: str = "auto"
    """auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """compute precision: auto = bfloat16 autocast on CUDA GPUs that support it, float16 on older ones, float32 otherwise"""
    compile: bool = False
    """torch.compile each transformer block"""
    dist: Literal["ddp", "fsdp"] = "ddp"
    """under torchrun with several processes: DDP (a full replica per device) or FSDP2 (sharded, for big models)"""
    sampling: Literal["random", "sequential"] = "random"
    """training batches at random offsets (nanoGPT) or read sequentially; each micro-batch slot owns a disjoint block"""
    save_checkpoints: bool = True
    """write RUN_DIR/latest and RUN_DIR/best at every eval"""
    logger: Literal["none", "wandb", "tensorboard"] = "none"
    """also send every metrics row to Weights & Biases or TensorBoard (RUN_DIR/tensorboard); needs its package"""
    wandb_project: Optional[str] = None
    """W&B project; null = gptforge"""
    run_name: Optional[str] = None
    """name of the run in W&B; null = the run directory's name"""
    init_from: Optional[str] = None
    """start from trained weights: gpt2, gpt2-medium, gpt2-large, gpt2-xl, a Hugging Face model directory (needs gptforge[hf]) or a gptforge run/checkpoint directory; the model's shape comes from them (block_size may shrink, dropout is yours)"""
    freeze_embeddings: bool = False
    """keep the token and position embeddings fixed while fine-tuning (a tied output head stays fixed with them)"""


@dataclass
class EvalConfig:
    """Benchmarks run during training (the `eval` section); the loss evaluation is in `train`."""

    hellaswag_every: int = 0
    """score HellaSwag every this many steps and at the end (0 = never); needs a gpt2 or bpe tokenizer"""
    hellaswag_file: Optional[str] = None
    """a local hellaswag_val.jsonl; null = download the official val set once into ~/.cache/gptforge"""
    hellaswag_limit: Optional[int] = None
    """score only the first N examples (faster, noisier); null = all 10,042"""
    hellaswag_batch_size: int = 8
    """HellaSwag examples per forward pass (4 sequences each)"""


@dataclass
class DataConfig:
    """Where the prepared tokens are (the `data` section)."""

    dir: str = ""
    """a directory written by `gptforge prepare` (train.bin, val.bin, meta.json)"""


@dataclass
class RunConfig:
    """Everything a training run needs; saved as config.json in the run directory and in every checkpoint."""

    model: GPTConfig = field(default_factory=GPTConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(d) - set(sections)
        if unknown:
            raise ConfigError(f"unknown config section(s): {', '.join(sorted(unknown))}")
        return cls(**{name: _section(name, d.get(name, {})) for name in sections})


_SECTION_TYPES = {"model": GPTConfig, "optim": OptimConfig, "train": TrainConfig, "eval": EvalConfig,
                  "data": DataConfig}


def _section(name: str, values: dict[str, Any]) -> Any:
    cls = _SECTION_TYPES[name]
    if not isinstance(values, dict):
        raise ConfigError(f"config section {name!r} must be a mapping, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown field(s) in {name}: {', '.join(sorted(unknown))}")
    return cls(**values)


def save_json(obj: Any, path) -> None:
    """Write JSON atomically (write a sibling temp file, then rename)."""
    import os

    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Presets: named recipes. Each is a partial config (section -> field -> value) applied before the
# config file and the command-line overrides, so anything here can be changed per run.

_GPT2_TRAINING = {
    # GPT-2 (124M) reproduction settings: ~0.5M tokens per step, lr 6e-4 -> 6e-5, betas 0.9/0.95.
    "optim": {"lr": 6e-4, "min_lr": 6e-5, "beta1": 0.9, "beta2": 0.95, "weight_decay": 0.1,
              "warmup_iters": 715, "grad_clip": 1.0},
    "train": {"max_iters": 19073, "batch_size": 16, "total_batch_size": 524288, "eval_interval": 250,
              "eval_iters": 20, "log_interval": 1},
}


def _gpt2(n_layer: int, n_head: int, n_embd: int) -> dict:
    model = {"n_layer": n_layer, "n_head": n_head, "n_embd": n_embd, "block_size": 1024,
             "bias": True, "dropout": 0.0, "pos": "learned", "norm": "layernorm", "mlp": "gelu",
             "tie_embeddings": True}
    return {"model": model, **_GPT2_TRAINING}


def _toygpt(n_layer: int, n_head: int, n_embd: int) -> dict:
    model = {"n_layer": n_layer, "n_head": n_head, "n_embd": n_embd, "block_size": 512,
             "bias": True, "dropout": 0.0, "tie_embeddings": True}
    return {"model": model, **_GPT2_TRAINING}


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "gpt2": _gpt2(12, 12, 768),
    "gpt2-medium": _gpt2(24, 16, 1024),
    "gpt2-large": _gpt2(36, 20, 1280),
    "gpt2-xl": _gpt2(48, 25, 1600),
    "toygpt-small": _toygpt(12, 8, 768),
    "toygpt-medium": _toygpt(16, 8, 1024),
    "toygpt-large": _toygpt(24, 16, 2048),
    # The modern rung of the ladder at GPT-2 small's size: RoPE, RMSNorm, SwiGLU, grouped-query
    # attention (4 kv heads for 12 query heads), no biases, untied embeddings.
    "llama": {
        "model": {"n_layer": 12, "n_head": 12, "n_kv_head": 4, "n_embd": 768, "block_size": 1024,
                  "pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False,
                  "tie_embeddings": False, "dropout": 0.0},
        **_GPT2_TRAINING,
    },
    # GPT-2 (124M) on OpenWebText, nanoGPT's recipe: 12 x 1024 x 40 = 491,520 tokens per step (5 micro-batches
    # per GPU on 8 GPUs), 600k steps, lr 6e-4 -> 6e-5 over the whole run after 2000 warmup steps, no biases.
    "gpt2-owt": {
        "model": {**_gpt2(12, 12, 768)["model"], "bias": False},
        "optim": {**_GPT2_TRAINING["optim"], "warmup_iters": 2000},
        "train": {"max_iters": 600000, "batch_size": 12, "total_batch_size": 491520, "eval_interval": 1000,
                  "eval_iters": 200, "log_interval": 10, "compile": True, "sampling": "random"},
    },
    # GPT-2 (124M) on FineWeb-edu sample-10BT, build-nanogpt's recipe: 64 x 1024 tokens per micro-batch,
    # 524,288 per step, 19,073 steps (one pass over 10B tokens), 715 warmup steps, data read sequentially.
    "gpt2-fineweb": {
        "model": _gpt2(12, 12, 768)["model"],
        "optim": dict(_GPT2_TRAINING["optim"]),
        "train": {"max_iters": 19073, "batch_size": 64, "total_batch_size": 524288, "eval_interval": 250,
                  "eval_iters": 20, "log_interval": 10, "sampling": "sequential"},
    },
    # nanoGPT's CPU recipe for character-level Shakespeare, exactly: 4 layers, 4 heads, 128 wide,
    # block 64, batch 12, lr 1e-3 warmed up over 100 steps then cosine to 1e-4 at 2000, beta2 0.99,
    # no dropout, no bias, fp32, no compile.
    "shakespeare-char-cpu": {
        "model": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "dropout": 0.0,
                  "bias": False, "pos": "learned", "norm": "layernorm", "mlp": "gelu",
                  "tie_embeddings": True},
        "optim": {"lr": 1e-3, "min_lr": 1e-4, "schedule": "cosine", "warmup_iters": 100,
                  "decay_iters": 2000, "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.1, "grad_clip": 1.0},
        "train": {"max_iters": 2000, "batch_size": 12, "total_batch_size": None, "eval_interval": 250,
                  "eval_iters": 20, "log_interval": 1, "dtype": "float32", "compile": False},
    },
    # The fastest way to nanoGPT's quality on a laptop CPU (benchmarks/speedrun_cpu.py measures it against
    # the recipe above): the same 4 x 4 x 128 shape and batch, with the modern block (RoPE, RMSNorm, a
    # squared-ReLU MLP, QK-norm, zero-initialised projections, no biases), Muon for the block matrices and
    # AdamW at a higher lr for the rest, a linear decay to zero laid over a wall-clock budget (default 60 s),
    # and fewer periodic evaluations (they spend the budget too).
    "speedrun-cpu": {
        "model": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "dropout": 0.0, "bias": False,
                  "pos": "rope", "norm": "rmsnorm", "mlp": "relu2", "qk_norm": True, "zero_init_proj": True,
                  "tie_embeddings": True},
        "optim": {"optimizer": "muon", "muon_lr": 0.01, "muon_momentum": 0.9, "muon_ns_steps": 5, "lr": 3e-3,
                  "min_lr": 0.0, "schedule": "linear", "warmup_iters": 30, "beta1": 0.9, "beta2": 0.99,
                  "weight_decay": 0.1, "grad_clip": 1.0},
        "train": {"time_budget": 60.0, "max_iters": 1_000_000, "batch_size": 12, "total_batch_size": None,
                  "eval_interval": 500, "eval_iters": 10, "log_interval": 50, "dtype": "float32",
                  "compile": False, "full_val_at_end": True},
    },
}


def preset(name: str) -> dict[str, dict[str, Any]]:
    """The partial config of a named preset (a deep copy)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return json.loads(json.dumps(PRESETS[name]))
