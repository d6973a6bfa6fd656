"""Configuration: one dataclass per concern with its own `validate()`, the named presets, the layering of
defaults < preset < config file (< the CLI's flags), and reading and writing config files.

A run is fully described by a `RunConfig` (model, optim, train, eval, data and lora sections). The CLI derives
`--section.field VALUE` flags from these dataclasses; the resolved config is written into the run
directory and into every checkpoint, so `eval` and `sample` rebuild everything from a checkpoint alone.
Each section checks its own fields when built (types, finiteness, ranges: impossible values are refused
before any work); `RunConfig.validate(world_size)` checks them all again plus what spans sections.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from gptforge.errors import UserError, one_line
from gptforge.files import atomic_write, path_problem
from gptforge.nanogpt.config_file import load_config_py


class ConfigError(UserError):
    """A configuration mistake: a bad value, an unknown preset, inconsistent fields."""


# ----------------------------------------------------------------------------------------------
# Checking values. Types first, so a config file's string "3e-4" or a nan is refused here in one line
# rather than failing (or training on silently) deep inside the run; then each section's ranges.


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin is Union:
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp in (int, float) and isinstance(value, bool):  # True is an int to Python, not to a user
        return False
    if tp is float:  # an int is a fine float; nan and inf pass no range check, so they are refused here
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + " | ".join(map(str, args))
    if origin is Union:
        return " or ".join(_type_name(a) for a in args)
    return {int: "an integer", float: "a finite number", bool: "true or false", str: "a string",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _check_types(section: str, obj: Any) -> None:
    for name, tp in _field_types(type(obj)).items():
        value = getattr(obj, name)
        if not _type_ok(value, tp):
            raise ConfigError(f"{section}.{name} must be {_type_name(tp)}, got {value!r}")


_RULES = {"> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, "at least 1": lambda v: v >= 1,
          "in [0, 1)": lambda v: 0 <= v < 1, "in [0, 1]": lambda v: 0 <= v <= 1}


def _check_ranges(section: str, obj: Any, rules: dict[str, str]) -> None:
    """Each named field must satisfy its rule (a key of _RULES), unless it is null ("not set")."""
    for name, rule in rules.items():
        value = getattr(obj, name)
        if value is not None and not _RULES[rule](value):
            raise ConfigError(f"{section}.{name} must be {rule}, got {value}")


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
    value_embeds: bool = False
    """give every layer a learned vector per token that is added to its attention values (value embeddings)"""
    unet_skips: bool = False
    """U-net: the first half of the blocks hand their outputs to the mirrored blocks of the second half, added in with learned weights"""
    logit_softcap: Optional[float] = None
    """squash the output logits smoothly into (-cap, cap) with cap * tanh(logits / cap); null = plain logits"""
    attention: Literal["sdpa", "manual"] = "sdpa"
    """scaled_dot_product_attention (fast, flash on GPU) or the step-by-step version for learners"""

    def __post_init__(self) -> None:
        _check_types("model", self)  # before the derived fields are computed from the others
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

    def param_count(self) -> int:
        """The parameters of GPT(self), counted from the shape alone (gptforge.model.GPT.num_params(False)
        gives the same number, and a test holds them equal): what memory checks read before building anything."""
        C, L, V, hs, b = self.n_embd, self.n_layer, self.vocab_size or 0, self.head_dim, int(self.bias)
        norm = C * (1 + b) if self.norm == "layernorm" else C
        qkv = (self.n_head + 2 * self.n_kv_head) * hs
        attn = (C + b) * qkv + (self.n_head * hs + b) * C + (2 * hs if self.qk_norm else 0)
        fc = 2 * self.mlp_hidden if self.mlp == "swiglu" else self.mlp_hidden
        mlp = (C + b) * fc + (self.mlp_hidden + b) * C
        n = L * (2 * norm + attn + mlp) + norm + V * C * (1 if self.tie_embeddings else 2)
        n += self.block_size * C if self.pos == "learned" else 0
        n += L * V * self.n_kv_head * hs if self.value_embeds else 0
        return n + (L // 2 if self.unet_skips else 0)

    def validate(self) -> None:
        _check_types("model", self)
        _check_ranges("model", self, {
            **{name: "at least 1" for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd",
                                               "n_kv_head", "mlp_hidden")},
            "dropout": "in [0, 1)", "norm_eps": "> 0", "rope_theta": "> 0", "logit_softcap": "> 0"})  # eps <= 0 or theta 0: NaN loss
        if self.n_embd % self.n_head:
            raise ConfigError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({self.n_kv_head})")
        if self.pos == "rope" and self.head_dim % 2:
            raise ConfigError(f"rope needs an even head size, got n_embd/n_head = {self.head_dim}")


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
    """AdamW's decay rate of the gradient's running mean (momentum)"""
    beta2: float = 0.95
    """AdamW's decay rate of the squared gradient's running mean"""
    eps: float = 1e-8
    """AdamW's epsilon, added to the denominator so tiny second moments do not blow up the update"""
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

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _check_types("optim", self)
        _check_ranges("optim", self, {
            "lr": "> 0", "min_lr": ">= 0", "warmup_iters": ">= 0", "warmup_frac": "in [0, 1)", "decay_iters": ">= 0",
            "cooldown_frac": "in [0, 1]", "weight_decay": ">= 0", "beta1": "in [0, 1)", "beta2": "in [0, 1)",
            "eps": "> 0", "grad_clip": ">= 0", "muon_lr": "> 0", "muon_momentum": "in [0, 1)",
            "muon_ns_steps": "at least 1"})
        if self.min_lr > self.lr:
            raise ConfigError(f"optim.min_lr ({self.min_lr}) must not exceed optim.lr ({self.lr}): "
                              "the schedule decays from lr down to min_lr")


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
    eval_at_start: bool = True
    """evaluate before the first step too (the untrained model's loss); false spends that time training"""
    full_val_at_end: bool = False
    """at the end, also measure the loss over the whole val split in non-overlapping windows of block_size (val_loss_full)"""
    log_interval: int = 10
    """print a log line every this many steps (every step is written to metrics.jsonl)"""
    seed: int = 1337
    """random seed of the initial weights, dropout and the training batches"""
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
    """start from trained weights: gpt2, gpt2-medium, gpt2-large, gpt2-xl, a Hugging Face model directory (needs gptforge[hf]), a gptforge run/checkpoint directory, a nanoGPT ckpt.pt or a .gguf file (needs gptforge[gguf]); the model's shape comes from them (block_size may shrink, dropout is yours)"""
    freeze_embeddings: bool = False
    """keep the token and position embeddings fixed while fine-tuning (a tied output head stays fixed with them)"""
    finetune: Literal["full", "lora"] = "full"
    """full: train every weight; lora: keep the --train.init_from weights frozen and train low-rank adapters (the lora section), checkpointing only them"""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _check_types("train", self)
        _check_ranges("train", self, {
            **{name: "at least 1" for name in ("batch_size", "eval_interval", "eval_iters", "log_interval",
                                               "stop_after", "total_batch_size")},
            "max_iters": ">= 0", "time_budget": "> 0"})


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

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _check_types("eval", self)
        _check_ranges("eval", self, {"hellaswag_every": ">= 0", "hellaswag_limit": "at least 1",
                                     "hellaswag_batch_size": "at least 1"})


@dataclass
class DataConfig:
    """Where the prepared tokens are (the `data` section)."""

    dir: str = ""
    """a directory written by `gptforge prepare` (train.bin, val.bin, meta.json)"""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _check_types("data", self)


LORA_TARGETS = ("query", "key", "value", "attn_proj", "mlp_fc", "mlp_proj")


@dataclass
class LoRAConfig:
    """Low-rank adapters for --train.finetune lora (the `lora` section): each targeted projection W becomes
    W + (alpha / rank) B A with A (rank x in) and B (out x rank) trained, W frozen."""

    rank: int = 8
    """rank r of each adapter (A is r x in, B is out x r)"""
    alpha: float = 16.0
    """scale numerator: an adapter adds (alpha / rank) B A"""
    dropout: float = 0.05
    """dropout on an adapter's input (training only)"""
    targets: str = "query,value"
    """comma-separated projections of every block to adapt: query, key, value, attn_proj (attention output), mlp_fc (the MLP's input projection; gate and up for SwiGLU), mlp_proj (its output projection), or all"""

    def __post_init__(self) -> None:
        self.validate()

    @property
    def target_list(self) -> tuple[str, ...]:
        """The targets as a tuple in LORA_TARGETS order ("all" expanded)."""
        named = {t.strip() for t in self.targets.split(",") if t.strip()}
        return LORA_TARGETS if "all" in named else tuple(t for t in LORA_TARGETS if t in named)

    def validate(self) -> None:
        _check_types("lora", self)
        _check_ranges("lora", self, {"rank": "at least 1", "alpha": "> 0", "dropout": "in [0, 1)"})
        named = [t.strip() for t in self.targets.split(",") if t.strip()]
        unknown = [t for t in named if t not in (*LORA_TARGETS, "all")]
        if unknown or not named:
            raise ConfigError(f"lora.targets must name some of {', '.join(LORA_TARGETS)} (comma-separated) or all, "
                              f"got {self.targets!r}")


@dataclass
class RunConfig:
    """Everything a training run needs; saved as config.json in the run directory and in every checkpoint."""

    model: GPTConfig = field(default_factory=GPTConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def validate(self, world_size: int = 1) -> None:
        """Every section's own checks (again: fields may have been set since the sections were built), then
        those that span sections. `world_size`: the number of processes that will train together."""
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        if self.optim.optimizer == "muon" and self.train.dist == "fsdp" and world_size > 1:
            raise ConfigError("optim.optimizer muon works with --train.dist ddp, not yet with fsdp "
                              "(it orthogonalises whole matrices, and FSDP holds shards of them)")
        if self.train.finetune == "lora":
            if not self.train.init_from:
                raise ConfigError("--train.finetune lora adapts a trained model: name it with --train.init_from "
                                  "(gpt2, a Hugging Face directory, a gptforge run, a nanoGPT ckpt.pt or a .gguf file)")
            if self.train.dist == "fsdp" and world_size > 1:
                raise ConfigError("--train.finetune lora works with --train.dist ddp, not fsdp: the frozen base is "
                                  "the same on every process, and the adapters are small enough to replicate")
            if self.train.freeze_embeddings:
                raise ConfigError("--train.freeze_embeddings applies to full fine-tuning; with lora every base "
                                  "weight is frozen already")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a mapping of sections (model, optim, train, eval, data, lora), "
                              f"got {type(d).__name__}")
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(d) - set(sections)
        if unknown:
            raise ConfigError(f"unknown config section(s): {', '.join(sorted(unknown))}")
        return cls(**{name: _section(name, d.get(name, {})) for name in sections})


_SECTION_TYPES = {"model": GPTConfig, "optim": OptimConfig, "train": TrainConfig, "eval": EvalConfig,
                  "data": DataConfig, "lora": LoRAConfig}


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
    """Write JSON atomically, through the one helper for atomic writes."""

    atomic_write(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# ----------------------------------------------------------------------------------------------
# Presets: named recipes. Each is a partial config (section -> field -> value) applied before the
# config file and the command-line overrides, so anything here can be changed per run.

_GPT2_TRAINING = {
    # GPT-2 (124M) reproduction settings: ~0.5M tokens per step, lr 6e-4 -> 6e-5, betas 0.9/0.95.
    "optim": {"lr": 6e-4, "min_lr": 6e-5, "beta1": 0.9, "beta2": 0.95, "weight_decay": 0.1,
              "warmup_iters": 715, "grad_clip": 1.0},
    "train": {"max_iters": 19073, "batch_size": 16, "total_batch_size": 524288, "eval_interval": 250,
              "eval_iters": 20, "log_interval": 10},
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


# Seconds of training `gptforge quickstart` gives its speedrun-cpu run (periodic evaluations included). The rest
# of the command (imports, prepare, the final whole-split val loss, two samples) took 10 s on a 2-core machine that
# others were not saturating, so the whole command stays within ~100 s there; README.md gives the measured figures.
QUICKSTART_TIME_BUDGET_S = 75.0
# Steps `gptforge quickstart --chat` trains its tiny chat model for (a step count, not seconds, so the held-out
# exact match it reaches does not depend on how busy the machine is); gptforge.quickstart has the recipe.
QUICKSTART_CHAT_MAX_ITERS = 2500

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
        # nanoGPT's lr_decay_iters 2000 equals its max_iters: "decay over the run", so decay_iters is left to
        # follow --train.max_iters. nanoGPT logs every step; every 50 keeps 40 lines (metrics.jsonl has all).
        "optim": {"lr": 1e-3, "min_lr": 1e-4, "schedule": "cosine", "warmup_iters": 100,
                  "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.1, "grad_clip": 1.0},
        "train": {"max_iters": 2000, "batch_size": 12, "total_batch_size": None, "eval_interval": 250,
                  "eval_iters": 20, "log_interval": 50, "dtype": "float32", "compile": False},
    },
    # The fastest way to nanoGPT's quality on a laptop CPU (benchmarks/speedrun_cpu.py measures it against
    # the recipe above): a smaller model (3 layers x 4 heads x 64 wide, block 64: more steps per second win
    # at these budgets) with the modern block (RoPE, RMSNorm, a squared-ReLU MLP, QK-norm, zero-initialised
    # projections, no biases, an untied output layer), batches of 16, Muon (3 Newton-Schulz steps) for the
    # block matrices and AdamW at a high lr for the rest, a short warmup and a linear decay to zero laid
    # over a wall-clock budget (default 60 s), no evaluation before the first step and few after it.
    "speedrun-cpu": {
        "model": {"n_layer": 3, "n_head": 4, "n_embd": 64, "block_size": 64, "dropout": 0.0, "bias": False,
                  "pos": "rope", "norm": "rmsnorm", "mlp": "relu2", "qk_norm": True, "zero_init_proj": True,
                  "tie_embeddings": False},
        "optim": {"optimizer": "muon", "muon_lr": 0.02, "muon_momentum": 0.9, "muon_ns_steps": 3, "lr": 2e-2,
                  "min_lr": 0.0, "schedule": "linear", "warmup_iters": 15, "beta1": 0.9, "beta2": 0.99,
                  "weight_decay": 0.1, "grad_clip": 1.0},
        "train": {"time_budget": 60.0, "max_iters": 1_000_000, "batch_size": 16, "total_batch_size": None,
                  "eval_interval": 500, "eval_iters": 10, "eval_at_start": False, "log_interval": 50, "dtype": "float32",
                  "compile": False, "full_val_at_end": True},
    },
    # Supervised fine-tuning on conversations (`gptforge prepare FILE --chat`, then --train.init_from a base
    # model, whose shape it takes): a low lr decaying linearly to 0 over a short run, no weight decay, frequent
    # evaluation of the assistant-token loss. 150 steps of 8 packed rows of 1024 tokens is about 3 epochs of
    # alpaca_5000.json (~370k train tokens with GPT-2's tokenizer); the model section is left to --train.init_from.
    "sft": {
        "optim": {"lr": 5e-5, "min_lr": 0.0, "schedule": "linear", "warmup_iters": 10, "weight_decay": 0.0,
                  "grad_clip": 1.0},
        "train": {"max_iters": 150, "batch_size": 8, "total_batch_size": None, "eval_interval": 25,
                  "eval_iters": 10, "log_interval": 10, "sampling": "random", "full_val_at_end": True},
    },
}


def preset(name: str) -> dict[str, dict[str, Any]]:
    """The partial config of a named preset (a deep copy)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return json.loads(json.dumps(PRESETS[name]))


# ----------------------------------------------------------------------------------------------
# Layering and config files: the config that the command line's flags then override.


def layered_defaults(preset_name: Optional[str] = None, config_file: Optional[str | Path] = None,
                     resume_dir: Optional[str | Path] = None) -> dict[str, Any]:
    """The base config as a dict of sections: a resumed run's saved config (preset and file are then not
    used), or dataclass defaults < the preset < the config file."""
    if resume_dir is not None:
        saved = Path(resume_dir) / "config.json"
        if not saved.is_file():
            raise UserError(f"{resume_dir} is not a run directory (no config.json) and cannot be resumed")
        return read_config_json(saved).to_dict()
    base = RunConfig().to_dict()
    base["model"].update({"n_kv_head": None, "mlp_hidden": None})  # derived again from the final shape
    if preset_name is not None:
        merge_sections(base, preset(preset_name))
    if config_file is not None:
        merge_sections(base, read_config_file(config_file), f"config file {config_file}: ")
    return base


def merge_sections(base: dict[str, Any], update: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Update `base`'s sections in place with the fields of `update` (a partial config); unknown names are
    refused here, where it is still clear which file they came from."""
    for section, values in update.items():
        if section not in base:
            raise ConfigError(f"{where}unknown config section {section!r}; sections are: {', '.join(base)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{where}config section {section!r} must be a mapping")
        unknown = set(values) - set(base[section])
        if unknown:
            raise ConfigError(f"{where}unknown field(s) in {section}: {', '.join(sorted(unknown))}")
        base[section].update(values)
    return base


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The sections of a --config file: YAML, JSON when it is named *.json, or a nanoGPT config/*.py (read,
    never run: see `nanogpt.load_config_py`)."""

    p = Path(path)
    if problem := path_problem(p, "file"):
        raise UserError(f"config file {path} {problem}")
    if p.suffix == ".py":

        return load_config_py(p)
    text = _read_text(p, f"config file {path}")
    try:
        if p.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - any parse error is the user's file
        raise UserError(f"cannot parse config file {path}: {one_line(e, 300)}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of sections (model, optim, train, eval, data, lora)")
    return data


def read_config_json(path: str | Path) -> RunConfig:
    """A config.json written by gptforge (a run directory's or a checkpoint's), checked like any other."""
    text = _read_text(Path(path), str(path))
    try:
        data = json.loads(text)
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({one_line(e)}); the file is damaged") from None
    try:
        return RunConfig.from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {one_line(e)}") from None


def _read_text(path: Path, what: str) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {what}: {e.strerror or one_line(e)}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{what} is not UTF-8 text (a binary file?)") from None
