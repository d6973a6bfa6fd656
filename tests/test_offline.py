"""Offline, errors come at once and whole: the reachability probe is bounded, the gpt2 tokenizer and the
Hugging Face hub say in our own sentence what was tried and what to do, a cached copy is used without
network, and `train` without data and HellaSwag on a char run fail before anything slow or drawn."""

import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import REPO
from gptforge import network, tokenizer
from gptforge.config import GPTConfig
from gptforge.errors import UserError
from gptforge.hellaswag import evaluate_hellaswag
from gptforge.model import GPT
from gptforge.tokenizer import CharTokenizer, GPT2Tokenizer


def assert_whole_line(msg: str, *fixes: str) -> None:
    """One line, nothing cut off, and it names what to do."""
    assert "\n" not in msg and "..." not in msg, msg
    for fix in fixes:
        assert fix in msg, (fix, msg)


@pytest.fixture
def no_proxy(monkeypatch):
    for key in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture
def offline(monkeypatch):
    """No host answers (what `reachable` says on a machine without network)."""
    monkeypatch.setattr(network, "reachable", lambda host, *a, **k: False)


# ---------------------------------------------------------------------------------------------- the probe


def test_reachable_opens_a_connection_and_tells_a_closed_port(no_proxy):
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        assert network.reachable("127.0.0.1", port, timeout=5)
    assert not network.reachable("127.0.0.1", port, timeout=5)  # closed now: refused


def test_a_lookup_that_hangs_counts_as_unreachable_within_the_timeout(monkeypatch, no_proxy):
    release = threading.Event()

    def hanging(*args, **kwargs):  # a DNS server that never answers
        release.wait(60)
        raise OSError("timed out")

    monkeypatch.setattr(socket, "create_connection", hanging)
    start = time.monotonic()
    try:
        assert not network.reachable("example.invalid", timeout=0.2)
        assert time.monotonic() - start < 10  # bounded by the timeout, not by the 60 s hang
    finally:
        release.set()


def test_behind_a_proxy_the_library_is_left_to_try(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("probed past the proxy"))
    assert network.reachable("huggingface.co")


# ---------------------------------------------------------------------------------------------- tiktoken


def test_tiktoken_cache_layout_is_what_tiktoken_wrote(tiktoken_cache):
    """The shared cache was written by tiktoken itself: if tiktoken renames its files, this fails first
    (and offline users with a cache would otherwise be told it is empty)."""
    assert tokenizer._tiktoken_gpt2_cached()


def test_gpt2_tokenizer_offline_fails_before_tiktoken_tries(tmp_path, monkeypatch, offline):
    import tiktoken

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: pytest.fail("tiktoken was left to time out"))
    with pytest.raises(UserError) as e:
        GPT2Tokenizer()
    assert_whole_line(str(e.value), "TIKTOKEN_CACHE_DIR", str(tmp_path), tokenizer.TIKTOKEN_HOST, "offline?")


def test_gpt2_tokenizer_with_its_cache_needs_no_network(tiktoken_cache, monkeypatch, offline):
    assert GPT2Tokenizer().encode("Hello world") == [15496, 995]


@pytest.mark.parametrize("error, words", [
    (ConnectionError("HTTPSConnectionPool(host='openaipublic.blob.core.windows.net', port=443): Max retries "
                     "exceeded with url: /gpt-2/encodings/main/vocab.bpe (Caused by NameResolutionError(" + "x" * 300),
     ["cannot download GPT-2's BPE files", "ConnectionError", "TIKTOKEN_CACHE_DIR"]),
    (ValueError("Hash mismatch for data downloaded from https://... (expected 1ce1664773c50f3e)"),
     ["do not match their known checksums", "try again", "TIKTOKEN_CACHE_DIR"]),
    (PermissionError(13, "Permission denied"), ["Permission denied", "set TIKTOKEN_CACHE_DIR to a folder you can write"]),
])
def test_gpt2_tokenizer_failures_are_our_sentences(tmp_path, monkeypatch, error, words):
    import tiktoken

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(network, "reachable", lambda host, *a, **k: True)

    def fail(name):
        raise error

    monkeypatch.setattr(tiktoken, "get_encoding", fail)
    with pytest.raises(UserError) as e:
        GPT2Tokenizer()
    assert_whole_line(str(e.value), *words)
    assert "Caused by" not in str(e.value)  # the library's text is not pasted in


# ---------------------------------------------------------------------------------------------- the hub


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_offline_without_a_copy_is_one_whole_sentence(hub_cache, offline):
    from gptforge.modelio.hf import resolve_hf_source

    with pytest.raises(UserError) as e:
        resolve_hf_source("gpt2")
    assert_whole_line(str(e.value), "openai-community/gpt2", "huggingface.co cannot be reached", str(hub_cache),
                      "pass a local directory", "HF_HUB_OFFLINE")


def test_hub_offline_uses_the_cached_copy(hub_cache, offline):
    from gptforge.modelio.hf import resolve_hf_source

    commit = "0" * 40  # the layout huggingface_hub writes: refs/main names the snapshot
    repo = hub_cache / "models--openai-community--gpt2"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert resolve_hf_source("gpt2") == repo / "snapshots" / commit


def test_hub_failure_we_cannot_name_is_kept_whole(hub_cache, monkeypatch):
    import huggingface_hub

    from gptforge.modelio.hf import resolve_hf_source

    monkeypatch.setattr(network, "reachable", lambda host, *a, **k: True)
    long = "a library's explanation " * 20

    def fail(*args, **kwargs):
        raise RuntimeError(long)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(UserError) as e:
        resolve_hf_source("someone/model")
    msg = str(e.value)
    assert msg.startswith("someone/model is not a local directory, and cannot download someone/model")
    assert_whole_line(msg, long.strip(), "pass a local directory")


# ---------------------------------------------------------------------------------------------- early checks


@pytest.mark.integration
def test_train_without_data_says_so_before_torch_loads(tmp_path):
    script = ("import sys\nfrom gptforge.cli import main\n"
              f"rc = main(['train', '--out', {str(tmp_path / 'run')!r}])\n"
              "print(rc, 'torch' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.stdout.split() == ["2", "False"], r.stdout + r.stderr
    assert "no data: pass --data DATA_DIR" in r.stderr
    assert not (tmp_path / "run").exists()


def test_hellaswag_with_a_char_vocabulary_fails_before_drawing_the_bar(capsys):
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz ", eot=False)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=32, vocab_size=tok.vocab_size)).eval()
    examples = [{"ctx": "a cat", "endings": ["sat", "ran", "ate", "hid"], "label": 0},
                {"ctx": "A Dog.", "endings": ["sat", "ran", "ate", "hid"], "label": 1}]  # 'A' is not in it
    with pytest.raises(UserError, match="HellaSwag needs a tokenizer that encodes any English text"):
        evaluate_hellaswag(model, tok, examples, torch.device("cpu"), progress=True)
    assert capsys.readouterr().err == ""  # no 0% bar drawn first
