"""Inference: everything between a loaded model and the text it writes.

`sampling` holds the pure filters on logits, `SamplingParams` (the one form of temperature / top-k / top-p /
seed / stop settings) and the exponential race that draws a token; `engine` the one KV cache (rows of their
own lengths), `step` (one forward of new tokens on it) and `stream`/`generate`; `text` turns growing ids into
printable text; `sample` and `chat` are the verbs on top. The server's continuous batching
(gptforge.serve.batcher) runs the same cache and the same `step`.
"""
