"""nanoGPT's files, read as they are and never run: `ckpt.pt` checkpoints, `data/NAME/` directories
(`train.bin`/`val.bin` + optional `meta.pkl`) and `config/*.py` recipes.

Nothing here executes a stranger's code. A checkpoint is read by `torch.load(weights_only=True)`, which
builds only tensors and plain containers; if it refuses a file we refuse it too, never retrying unsafely.
`meta.pkl` goes through an unpickler whose `find_class` refuses every name, so only pickle's own opcodes
(dicts, lists, strings, numbers) can load: nothing callable can ever be reached. A config file is parsed
with `ast`; only top-level `name = literal` assignments are read (`ast.literal_eval`), anything else is
reported and skipped.

nanoGPT's model is the classic rung of our ladder with GPT-2's parameter names and `nn.Linear` layers,
so its weights load by a key copy (after stripping torch.compile's `_orig_mod.` prefix and dropping the
causal-mask buffers it registers as `attn.bias` when flash attention is unavailable).

The package: `data` (meta.pkl and data/NAME/ directories), `checkpoint` (ckpt.pt: read, import, --init-from)
and `config_file` (config/*.py). `data` and `config_file` import neither the model nor the config, so the
data loader and the config layering import them without an import cycle; this file imports none of them,
so importing one never loads the others.
"""
