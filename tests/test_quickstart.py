"""gptforge.quickstart: the announced model shape is the recipe's, and `quickstart --chat` end to end on a
tiny step count and a small synthetic set (the plain quickstart's run is tests/test_cli.py's)."""

import json
import re

import pytest

from gptforge import quickstart as qs
from gptforge.cli import main
from gptforge.data import synthetic_chat


class Stop(Exception):
    pass


def test_the_plain_quickstart_announces_the_shape_it_trains(tmp_path, monkeypatch):
    said = []
    monkeypatch.setattr(qs, "prepare", lambda *a, **k: None)

    def train(cfg, *a, **k):
        said.append(cfg.model)
        raise Stop

    monkeypatch.setattr(qs, "train", train)
    with pytest.raises(Stop):
        qs.quickstart(tmp_path / "q", max_iters=5, log=said.append)
    model = said[-1]
    line = next(s for s in said if isinstance(s, str) and s.startswith("[2/3]"))
    assert f"{model.n_layer} layers, {model.n_head} heads, {model.n_embd} wide" in line
    assert "3 layers, 4 heads, 64 wide" in line  # the speedrun-cpu recipe's, as config.py has it


@pytest.mark.integration
def test_quickstart_chat_end_to_end(tmp_path, monkeypatch, capsys):
    # a small set, so the test takes seconds: the pipeline is the same at any size
    monkeypatch.setattr(synthetic_chat, "N_TRAIN", 200)
    monkeypatch.setattr(synthetic_chat, "HELDOUT_PER_SKILL", {skill: 2 for skill in synthetic_chat.SKILLS})
    out = tmp_path / "qc"
    argv = ["quickstart", "--chat", "--out", str(out), "--max-iters", "1", "--device", "cpu"]
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert re.search(r"held-out exact match \d+\.\d% \(\d+/16; .*\) after 1 step in", said), said
    for skill in synthetic_chat.SKILLS:
        assert re.search(rf"^  {skill} +\d+\.\d%  \(\d+/2\)$", said, re.M), skill
    for verb in ("chat", "serve"):
        assert f"gptforge {verb} {out / 'run'}" in said
    assert f"--task chat --file {out / 'heldout.jsonl'}" in said

    tokenizer = json.loads((out / "data" / "tokenizer.json").read_text())
    assert tokenizer["kind"] == "char" and tokenizer.get("chat")  # the chat template travels with the data
    config = json.loads((out / "run" / "config.json").read_text())
    assert config["train"]["max_iters"] == 1 and config["model"]["block_size"] == synthetic_chat.MAX_TOKENS
    heldout = [json.loads(line) for line in (out / "heldout.jsonl").read_text().splitlines()]
    assert len(heldout) == 16 and len((out / "train.jsonl").read_text().splitlines()) == 200

    # a second time without --overwrite: one line, nothing touched; with it, a new run
    before = (out / "run" / "config.json").stat().st_mtime_ns
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and err.count("\n") == 1 and f"gptforge chat {out / 'run'}" in err
    assert (out / "run" / "config.json").stat().st_mtime_ns == before
    assert main([*argv, "--overwrite"]) == 0
    assert "held-out exact match" in capsys.readouterr().out


def test_quickstart_chat_refuses_bad_lengths_before_writing(tmp_path, capsys):
    out = tmp_path / "qc"
    assert main(["quickstart", "--chat", "--out", str(out), "--max-iters", "0"]) == 2
    assert "--max-iters must be at least 1" in capsys.readouterr().err
    assert main(["quickstart", "--chat", "--out", str(out), "--max-iters", "5", "--time-budget", "9"]) == 2
    assert "not both" in capsys.readouterr().err and not out.exists()
