"""Tiny models and helpers that tests in several folders share (tests/ is on sys.path through conftest.py)."""

import threading
import time

import torch

from gptforge.chat_template import render_conversation
from gptforge.config import GPTConfig, RunConfig
from gptforge.modelio.checkpoint import model_state, write_checkpoint
from gptforge.infer.engine import generate
from gptforge.infer.sampling import SamplingParams
from gptforge.model import GPT
from gptforge.serve.batcher import Request

CHARS = "abcdefghijklmnopqrstuvwxyz .,!?"  # the alphabet of the tiny char models


def tiny_gpt(seed: int = 0, **overrides) -> GPT:
    cfg = dict(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=64, dropout=0.0)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**cfg))
    # A wider spread of weights than GPT-2's init gives logits far apart, so greedy ids do not
    # hinge on rounding; any disagreement between the paths is then a real bug.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model.eval()


def reference_greedy(model: GPT, idx: torch.Tensor, n: int) -> torch.Tensor:
    """The plainest decode there is: full forward on the last block_size tokens, argmax."""
    with torch.no_grad():
        for _ in range(n):
            logits = model(idx[:, -model.config.block_size:])[:, -1]
            idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
    return idx


def prompt(B: int, T: int, seed: int = 1, vocab: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


VARIANTS = {
    "learned": {},
    "rope-gqa-qknorm": dict(pos="rope", n_kv_head=2, qk_norm=True, norm="rmsnorm", mlp="swiglu", bias=False,
                            tie_embeddings=False),
    "learned-mqa-manual": dict(n_kv_head=1, attention="manual"),
}


def tiny_chat_model(tok, seed=0, block_size=64, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size, vocab_size=tok.vocab_size,
                          dropout=0.0, **overrides))
    with torch.no_grad():  # logits far apart: greedy ids do not hinge on rounding
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model.eval()


def fresh_greedy(model, tok, prompt, n):
    """The reply a model gives to the whole prompt from scratch (no reused cache), cut at the first marker."""
    out = generate(model, torch.tensor([prompt]), n, 0.0, eot_id=tok.chat.end_id, vocab_size=tok.vocab_size)
    answer = []
    for t in out[0, len(prompt):].tolist():
        if t in tok.chat.ids.values() or t == tok.eot_id:
            break
        answer.append(t)
    return answer


def nonempty_seed(tok, text="hello there", **kw) -> int:
    """A model seed whose first greedy reply to `text` is not empty (a random model may end at once)."""
    for seed in range(20):
        model = tiny_chat_model(tok, seed, **kw)
        if fresh_greedy(model, tok, render_conversation(tok, [{"role": "user", "content": text}],
                                                        for_generation=True)[0], 8):
            return seed
    raise AssertionError("no seed gives a non-empty reply")


def request(prompt, max_tokens, emit, n=1, stop_ids=frozenset(), **sampling) -> Request:
    """A batcher Request with the sampling settings given as keywords (temperature=..., seed=..., stop=...)."""
    return Request(prompt, max_tokens, emit, n=n, params=SamplingParams(**sampling), stop_ids=stop_ids)


def quiet(msg):
    """A `log` for train() that says nothing."""


def run_config(data_dir, **train_kw):
    """A tiny run (2 layers x 2 heads x 32 wide, block 16, 20 steps of 4 rows) on `data_dir`; train fields as keywords."""
    cfg = RunConfig()
    cfg.model = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)
    cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_iters = 3e-3, 3e-4, 2
    cfg.train.batch_size, cfg.train.eval_iters, cfg.train.eval_interval, cfg.train.max_iters = 4, 4, 100, 20
    for k, v in train_kw.items():
        setattr(cfg.train, k, v)
    cfg.data.dir = str(data_dir)
    return cfg


def save_hf_gpt2(path, n_embd=32, n_head=2, n_positions=64, seed=0):
    """A random 2-layer transformers GPT-2 with OpenAI's 50,257-token vocabulary, saved in `path`."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=n_embd, n_head=n_head, n_positions=n_positions, vocab_size=50257)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


def save_run(path, model, tok):
    """`model` and `tok` written as a checkpoint directory that every verb loads."""
    write_checkpoint(path, model_state(model), RunConfig(model=model.config), tok, state={"step": 1})
    return path


def save_adapter_run(path, base, lora_cfg, seed=1, token_ids=(), tok=None):
    """LoRA adapters on the model source `base` (random, non-zero: what training leaves) written as an adapter
    checkpoint directory, as a LoRA run writes one; `tok` the run's tokenizer (default: the base's)."""
    from gptforge import lora
    from gptforge.config import TrainConfig
    from gptforge.modelio import load

    model, cfg, base_tok = load.load_init(str(base))
    digest = lora.weights_sha256(model)
    tok = tok or base_tok
    if tok.vocab_size > cfg.vocab_size:  # as train grows them (setup.load_init)
        from gptforge.model import grow_vocab
        from gptforge.train.setup import pad_vocab

        grow_vocab(model, pad_vocab(tok.vocab_size))
    lora.attach(model, lora_cfg, token_ids)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.lora.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    run = RunConfig(model=model.config, train=TrainConfig(init_from=str(base), finetune="lora"), lora=lora_cfg)
    write_checkpoint(path, lora.adapter_state(model), run, tok,
                     state={"step": 1, "base": load.base_identity(str(base), digest)})
    return path


class LiveServer:
    """build_server's app under uvicorn as `gptforge serve` configures it (server_kw: server_config's limits)."""

    def __init__(self, run, server_kw=None, **kw):
        import uvicorn

        from gptforge.serve import _bind, build_server
        from gptforge.serve.connection import server_config

        self.built = build_server(run, device="cpu", **kw)
        self.app, self.engine = self.built.app, self.built.batcher
        sock = _bind("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(server_config(self.app, log_level="error", **(server_kw or {})))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started and time.time() < deadline:
            time.sleep(0.01)
        assert self.server.started

    def client(self, **kw):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0,
                             timeout=60, **kw)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.built.close()


def tick_progress(monkeypatch) -> None:
    """gptforge.progress.CLOCK moving a whole period at every reading, so that a long step driven from a test
    writes its off-terminal progress line at every update, without sleeping."""
    from gptforge import progress

    now = [0.0]

    def tick() -> float:
        now[0] += progress.EVERY_S
        return now[0]

    monkeypatch.setattr(progress, "CLOCK", tick)
