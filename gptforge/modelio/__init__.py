"""Model I/O: where weights come from and where they go.

`checkpoint` is storage (the run directory, atomic writes, safe reads of safetensors and JSON); `load` is the
one loader, answering "what is this source" (a gptforge run or checkpoint, a GPT-2 name, a Hugging Face
directory, a nanoGPT ckpt.pt) and returning a ready model and tokenizer; `hf` translates to and from
`transformers` directories (nanoGPT's own files are read by gptforge.nanogpt).
"""
