"""`gptforge export RUN --to peft OUT`: a LoRA run's adapters as a Hugging Face PEFT adapter directory
(adapter_config.json + adapter_model.safetensors) for the base model's `transformers` export (`--to hf`).

transformers + PEFT then compute what gptforge computes: `PeftModel.from_pretrained(base, OUT)` gives our merged
model's logits. Our adapters map onto PEFT's as follows (see gptforge.lora for ours):
- Llama shape (LlamaForCausalLM): one to one: query, key, value, attn_proj -> self_attn.q_proj, k_proj, v_proj,
  o_proj; SwiGLU's gate and up -> mlp.gate_proj, up_proj; mlp_proj -> mlp.down_proj.
- GPT-2 shape (GPT2LMHeadModel): HF's GPT-2 keeps q, k and v in one `attn.c_attn` as we do, so adapters on several
  of them become one PEFT adapter on c_attn of rank n x r: A stacks the parts' A, B places each part's B on its
  rows (zeros elsewhere), and `rank_pattern` / `alpha_pattern` keep the scale alpha / r. GPT-2's Conv1D layers
  are `fan_in_fan_out`.
- Trained token rows (the chat markers of an SFT from a base model) are PEFT's `trainable_token_indices`, whose
  values replace the base's rows as ours do (a tied output layer follows the embedding).
Nothing here reads the base model: the adapter checkpoint's config says its shape.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from gptforge import __version__, lora
from gptforge.config import RunConfig
from gptforge.errors import UserError
from gptforge.files import check_output_dir
from gptforge.modelio.checkpoint import (is_adapter, read_adapter, read_config, read_state, resolve_checkpoint,
                                         umask_mode, write_dir_atomically)
from gptforge.modelio.hf import HF_CLASSES, HF_TOKENIZER_KINDS, OWN_TOKENIZER, hf_architecture, write_hf_tokenizer
from gptforge.tokenizer import load_tokenizer

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json", OWN_TOKENIZER,
              "README.md")

# our adapter part -> (HF module inside a block, whether its rows start at our part's start: a fused c_attn)
_HF_MODULE = {
    "gpt2": {"query": "attn.c_attn", "key": "attn.c_attn", "value": "attn.c_attn", "attn_proj": "attn.c_proj",
             "mlp_fc": "mlp.c_fc", "mlp_proj": "mlp.c_proj"},
    "llama": {"query": "self_attn.q_proj", "key": "self_attn.k_proj", "value": "self_attn.v_proj",
              "attn_proj": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
              "mlp_fc": "mlp.up_proj", "mlp_proj": "mlp.down_proj"},  # mlp_fc: Arcee's relu2 MLP (no gate)
}
_BLOCKS = {"gpt2": "base_model.model.transformer.h", "llama": "base_model.model.model.layers"}
_EMBED = {"gpt2": ("wte", "base_model.model.transformer.wte"), "llama": ("embed_tokens", "base_model.model.model.embed_tokens")}


def peft_tensors(cfg: RunConfig, arch: str, adapters: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """PEFT's tensors for our adapter state dict, and the adapter_config.json fields they need."""
    m, r, alpha = cfg.model, cfg.lora.rank, cfg.lora.alpha
    fused = arch == "gpt2"
    arch = "gpt2" if fused else "llama"  # Qwen3 and Arcee name their modules as Llama does
    groups: dict[str, list[lora.Part]] = {}
    for p in lora.parts(m, cfg.lora.target_list):
        groups.setdefault(_HF_MODULE[arch][p.name], []).append(p)
    out: dict[str, torch.Tensor] = {}
    rank_pattern, alpha_pattern = {}, {}
    for i in range(m.n_layer):
        for module, group in groups.items():
            A = [adapters[f"{lora.PREFIX}h.{i}.{p.name}.A"] for p in group]
            B = [adapters[f"{lora.PREFIX}h.{i}.{p.name}.B"] for p in group]
            width = _fused_rows(m, module) if fused else group[0].end - group[0].start
            big_B = torch.zeros(width, r * len(group))
            for j, (p, b) in enumerate(zip(group, B)):
                start = p.start if fused else 0
                big_B[start:start + b.shape[0], j * r:(j + 1) * r] = b
            out[f"{_BLOCKS[arch]}.{i}.{module}.lora_A.weight"] = torch.cat(A).contiguous()
            out[f"{_BLOCKS[arch]}.{i}.{module}.lora_B.weight"] = big_B
            if len(group) > 1:
                rank_pattern[module], alpha_pattern[module] = r * len(group), alpha * len(group)
    fields: dict[str, Any] = {"target_modules": sorted(groups), "fan_in_fan_out": fused,
                              "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
                              "trainable_token_indices": None}
    ids = lora.token_ids_of(adapters)
    if ids:
        name, key = _EMBED[arch]
        fields["trainable_token_indices"] = {name: ids}
        out[f"{key}.token_adapter.trainable_tokens_delta"] = adapters[f"{lora.PREFIX}tokens.wte"].contiguous()
        if not m.tie_embeddings:
            fields["trainable_token_indices"]["lm_head"] = ids
            out["base_model.model.lm_head.token_adapter.trainable_tokens_delta"] = adapters[f"{lora.PREFIX}tokens.head"].contiguous()
    return out, fields


def _fused_rows(m, module: str) -> int:
    """Rows of a GPT-2 module (its Conv1D's output width)."""
    return {"attn.c_attn": (m.n_head + 2 * m.n_kv_head) * m.head_dim, "attn.c_proj": m.n_embd,
            "mlp.c_fc": m.mlp_hidden, "mlp.c_proj": m.n_embd}[module]


def export_peft(run_or_checkpoint: str | Path, out_dir: str | Path, *, which: str = "latest",
                overwrite: bool = False) -> dict[str, Any]:
    """Write a LoRA run's adapters as a PEFT adapter directory (see the module docstring); returns what was
    written, with notes on loading it."""
    from safetensors.torch import save_file

    ckpt = resolve_checkpoint(run_or_checkpoint, which)
    if not is_adapter(ckpt):
        raise UserError(f"{ckpt} is a whole model, not LoRA adapters: --to peft writes the adapters of a run trained "
                        "with --train.finetune lora (export a whole model with --to hf)")
    cfg, state = read_config(ckpt), read_state(ckpt)
    arch = hf_architecture(cfg.model)  # a base transformers cannot compute has no PEFT adapter either
    out = Path(out_dir)
    check_output_dir(out, overwrite, (Path(run_or_checkpoint), ckpt))
    tensors, fields = peft_tensors(cfg, arch, read_adapter(ckpt))
    base = (state.get("base") or {}).get("source") or cfg.train.init_from
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "inference_mode": True,
        "r": cfg.lora.rank, "lora_alpha": cfg.lora.alpha, "lora_dropout": cfg.lora.dropout, "bias": "none",
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "modules_to_save": None, **fields,
    }
    tok = load_tokenizer(ckpt)
    notes = [f"Load it onto the base's transformers export: `gptforge export {base} --to hf BASE_HF`, then "
             f"`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_HF), \"{out}\")`."]
    if tok.kind in HF_TOKENIZER_KINDS:
        notes.append(f"The run's tokenizer is here too: `AutoTokenizer.from_pretrained(\"{out}\")`"
                     + (" (with the chat markers and template)." if tok.chat is not None else "."))
    if fields["trainable_token_indices"]:
        ids = next(iter(fields["trainable_token_indices"].values()))
        notes.append(f"It trains the rows of {len(ids)} tokens the base lacked (the "
                     f"chat markers); the model has {cfg.model.vocab_size:,} vocabulary rows: if the base has fewer, call "
                     f"`model.resize_token_embeddings({cfg.model.vocab_size})` before loading the adapter.")

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        umask_mode(tmp / "adapter_model.safetensors")
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
        write_hf_tokenizer(tmp, tok, cfg.model.block_size)
        (tmp / "README.md").write_text(f"# LoRA adapters exported by gptforge {__version__}\n\nFrom `{ckpt}`, for "
                                       f"`{base}` (a `{HF_CLASSES[arch]}`)."
                                       "\n\n" + "\n\n".join(notes) + "\n")

    write_dir_atomically(out, write, PEFT_FILES)
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    return {"path": str(out), "architecture": arch, "base": base, "target_modules": fields["target_modules"],
            "rank": cfg.lora.rank, "bytes": size, "notes": notes}
