"""Multi-process training under torchrun on CPU (gloo): DDP and FSDP match one process, checkpoints move
between layouts, and ranks read disjoint data. Select with `-m dist`, skip with `-m "not dist"`."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from gptforge.modelio.load import load_checkpoint
from gptforge.data.loader import SequentialBatches, SlotLoader
from gptforge.data.prepare import prepare

pytestmark = pytest.mark.dist

TINY = ["--model.n_layer", "2", "--model.n_head", "2", "--model.n_embd", "32", "--model.block_size", "16",
        "--train.batch_size", "4", "--train.total_batch_size", "128", "--train.eval_iters", "3",
        "--train.eval_interval", "4", "--train.log_interval", "100", "--optim.lr", "3e-3",
        "--optim.warmup_iters", "2", "--train.max_iters", "8", "--device", "cpu"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "pydoc"
    prepare("pydoc", out, tokenizer="char", progress=False)
    return out


def run(args, nproc=1, check=True):
    if nproc == 1:
        cmd = [sys.executable, "-m", "gptforge", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "gptforge", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if check:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def curve(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r], [r["val_loss"] for r in rows if "val_loss" in r]


def logits(run_dir):
    torch.manual_seed(0)
    x = torch.randint(0, 60, (2, 16))
    return load_checkpoint(run_dir).model(x)


@pytest.fixture(scope="module")
def single(data_dir, tmp_path_factory):
    """The reference: one process, 2 micro-batches of 4 x 16 tokens accumulated per step."""
    out = tmp_path_factory.mktemp("single") / "run"
    run(["train", "--data", str(data_dir), "--out", str(out), *TINY])
    return out


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_equal_one_rank_with_accumulation(data_dir, single, tmp_path, mode):
    out = tmp_path / mode
    r = run(["train", "--data", str(data_dir), "--out", str(out), *TINY, "--dist", mode], nproc=2)
    assert f"x 1 accum x 2 procs ({mode})" in r.stdout  # the total batch was kept: 4 x 16 x 1 x 2 = 128
    (steps_a, val_a), (steps_b, val_b) = curve(single), curve(out)
    assert [s for s, _ in steps_a] == [s for s, _ in steps_b] == list(range(1, 9))
    np.testing.assert_allclose([l for _, l in steps_b], [l for _, l in steps_a], rtol=0, atol=2e-6)
    np.testing.assert_allclose(val_b, val_a, rtol=0, atol=2e-6)
    torch.testing.assert_close(logits(out), logits(single), atol=1e-5, rtol=1e-5)


@pytest.mark.integration
def test_lora_on_two_ranks_equals_one_rank_with_accumulation(data_dir, single, tmp_path):
    """The base (the `single` run) frozen on both ranks, the adapters' gradients averaged by DDP."""
    lora = ["--init-from", str(single), "--finetune", "lora", "--lora.targets", "all", "--lora.dropout", "0",
            "--optim.lr", "1e-2"]
    run(["train", "--data", str(data_dir), "--out", str(tmp_path / "one"), *TINY, *lora])
    r = run(["train", "--data", str(data_dir), "--out", str(tmp_path / "two"), *TINY, *lora, "--dist", "ddp"], nproc=2)
    assert "x 1 accum x 2 procs (ddp)" in r.stdout and "lora: rank 8" in r.stdout
    (steps_a, val_a), (steps_b, val_b) = curve(tmp_path / "one"), curve(tmp_path / "two")
    np.testing.assert_allclose([l for _, l in steps_b], [l for _, l in steps_a], rtol=0, atol=2e-6)
    np.testing.assert_allclose(val_b, val_a, rtol=0, atol=2e-6)
    torch.testing.assert_close(logits(tmp_path / "two"), logits(tmp_path / "one"), atol=1e-5, rtol=1e-5)
    r = run(["train", "--data", str(data_dir), "--out", str(tmp_path / "fsdp"), *TINY, *lora, "--dist", "fsdp"],
            nproc=2, check=False)
    assert r.returncode != 0 and "not fsdp" in r.stderr  # each rank exits 2, torchrun then 1


@pytest.mark.integration
def test_ddp_checkpoint_resumes_in_one_process(data_dir, single, tmp_path):
    out = tmp_path / "ddp-then-single"
    run(["train", "--data", str(data_dir), "--out", str(out), *TINY, "--train.stop_after", "5"], nproc=2)
    assert load_checkpoint(out).state["step"] == 5 and load_checkpoint(out).state["world_size"] == 2
    r = run(["train", "--resume", str(out), "--train.stop_after", "100"])
    assert "resuming from" in r.stdout and "another number of micro-batches" not in r.stdout
    steps_a, _ = curve(single)
    steps_b, _ = curve(out)
    assert [s for s, _ in steps_b] == list(range(1, 9))
    np.testing.assert_allclose([l for _, l in steps_b], [l for _, l in steps_a], rtol=0, atol=2e-6)
    torch.testing.assert_close(logits(out), logits(single), atol=1e-5, rtol=1e-5)


@pytest.mark.integration
def test_single_process_checkpoint_resumes_under_fsdp(data_dir, single, tmp_path):
    out = tmp_path / "single-then-fsdp"
    run(["train", "--data", str(data_dir), "--out", str(out), *TINY, "--train.stop_after", "3"])
    run(["train", "--resume", str(out), "--dist", "fsdp"], nproc=2)  # stop_after is kept: 3 more steps
    assert load_checkpoint(out).state["step"] == 6
    run(["train", "--resume", str(out), "--dist", "fsdp"], nproc=2)  # and the last 2 (FSDP -> FSDP)
    steps_a, _ = curve(single)
    steps_b, _ = curve(out)
    np.testing.assert_allclose([l for _, l in steps_b], [l for _, l in steps_a], rtol=0, atol=2e-6)
    torch.testing.assert_close(logits(out), logits(single), atol=1e-5, rtol=1e-5)


@pytest.mark.integration
def test_total_batch_that_does_not_divide_is_a_clear_error(data_dir, tmp_path):
    r = run(["train", "--data", str(data_dir), "--out", str(tmp_path / "r"), *TINY, "--train.total_batch_size", "192"],
            nproc=2, check=False)
    assert r.returncode != 0
    assert "must be a multiple of batch_size x block_size x processes = 4 x 16 x 2 = 128" in r.stderr


@pytest.mark.parametrize("sampling", ["random", "sequential"])
def test_ranks_read_disjoint_contiguous_blocks(sampling):
    tokens = np.arange(10_000, dtype=np.uint16)  # each token is its own position
    world, accum = 2, 2
    seen = []
    for rank in range(world):
        loader = SlotLoader(tokens, sampling, 4, 16, seed=1, rank=rank, world_size=world, accum=accum)
        for micro in range(accum):
            xs = [loader.next(micro)[0] for _ in range(30)]
            positions = torch.cat(xs).flatten().numpy()
            seen.append((positions.min(), positions.max()))
    seen.sort()
    for (lo_a, hi_a), (lo_b, hi_b) in zip(seen, seen[1:]):
        assert hi_a < lo_b  # blocks never overlap
    blocks = [(s * 10_000 // 4, (s + 1) * 10_000 // 4) for s in range(4)]
    for (lo, hi), (b_lo, b_hi) in zip(seen, blocks):
        assert b_lo <= lo and hi < b_hi


def test_sequential_reads_straight_through_and_resumes():
    tokens = np.arange(1000, dtype=np.uint16)
    s = SequentialBatches(tokens, 2, 8, slot=1, n_slots=2)  # owns tokens 500..999
    x, y = s.next()
    assert x.tolist() == [list(range(500, 508)), list(range(508, 516))]
    assert y.tolist() == [list(range(501, 509)), list(range(509, 517))]
    state = s.state_dict()
    expected = [s.next()[0] for _ in range(40)]  # wraps around the block on the way
    s2 = SequentialBatches(tokens, 2, 8, slot=1, n_slots=2)
    s2.load_state_dict(state)
    assert all(torch.equal(a, s2.next()[0]) for a in expected)
    assert s2.epoch >= 1 and all(500 <= int(t) < 1000 for a in expected for t in a.flatten())


@pytest.mark.integration
def test_time_budget_and_muon_under_ddp(data_dir, tmp_path):
    """Ranks agree on the clock (none waits forever for another's step) and Muon runs under DDP; FSDP
    refuses Muon in one line."""
    out = tmp_path / "budget"
    flags = [a for a in TINY if a not in ("--train.max_iters", "8")]
    run(["train", "--data", str(data_dir), "--out", str(out), *flags, "--train.max_iters", "100000",
         "--train.time_budget", "3", "--optim.optimizer", "muon", "--train.eval_interval", "100000"], nproc=2)
    steps, vals = curve(out)
    assert len(steps) >= 2 and len(vals) == 2  # evaluated at step 0 and at the end
    assert load_checkpoint(out).state["step"] == steps[-1][0]
    r = run(["train", "--data", str(data_dir), "--out", str(tmp_path / "fsdp"), *TINY, "--dist", "fsdp",
             "--optim.optimizer", "muon"], nproc=2, check=False)
    assert r.returncode != 0 and "muon works with --train.dist ddp, not yet with fsdp" in r.stdout + r.stderr
