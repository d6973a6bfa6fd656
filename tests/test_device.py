"""The CPU peak used for MFU: measured once per machine, kept in the gptforge cache, never trusted blindly."""

import json

import torch

import gptforge.device as device


def _fresh(monkeypatch, tmp_path, measured=5e10):
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(device, "_measured_peak", {})
    calls = []

    def fake_matmul(dev, dtype, seconds=0.3):
        calls.append(seconds)
        return measured

    monkeypatch.setattr(device, "measure_matmul_flops", fake_matmul)
    monkeypatch.setattr(device.time, "sleep", lambda s: None)
    return calls


def test_peak_is_measured_once_then_read_from_the_cache(monkeypatch, tmp_path):
    calls = _fresh(monkeypatch, tmp_path)
    cpu = torch.device("cpu")
    assert device.peak_flops(cpu, torch.float32) == 5e10 and len(calls) == 3  # best of three
    cache = tmp_path / "cache" / device.PEAK_CACHE_NAME
    assert list(json.loads(cache.read_text()).values()) == [5e10]
    monkeypatch.setattr(device, "_measured_peak", {})  # a new process
    assert device.peak_flops(cpu, torch.float32) == 5e10 and len(calls) == 3  # not measured again
    assert device.peak_flops(cpu, torch.bfloat16) == 5e10 and len(calls) == 6  # another dtype is another entry


def test_a_remeasured_peak_only_ever_raises_the_cached_one(monkeypatch, tmp_path):
    _fresh(monkeypatch, tmp_path, measured=5e10)
    cpu = torch.device("cpu")
    device.peak_flops(cpu, torch.float32)
    monkeypatch.setattr(device, "measure_matmul_flops", lambda d, t, seconds=0.3: 1e10)  # a busy moment
    assert device.measure_peak_flops(cpu, torch.float32) == 5e10
    monkeypatch.setattr(device, "measure_matmul_flops", lambda d, t, seconds=0.3: 9e10)  # a quieter one
    assert device.measure_peak_flops(cpu, torch.float32) == 9e10
    key = device._peak_cache_key(torch.float32)
    assert json.loads((tmp_path / "cache" / device.PEAK_CACHE_NAME).read_text())[key] == 9e10


def test_a_damaged_or_unwritable_cache_means_measuring(monkeypatch, tmp_path):
    calls = _fresh(monkeypatch, tmp_path)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / device.PEAK_CACHE_NAME).write_bytes(b"\x00not json")
    assert device.peak_flops(torch.device("cpu"), torch.float32) == 5e10 and len(calls) == 3
    monkeypatch.setattr(device, "_measured_peak", {})
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path / "file"))
    (tmp_path / "file").write_text("a file where the cache directory should be")
    assert device.peak_flops(torch.device("cpu"), torch.float32) == 5e10  # measured; the write failure is ignored


def test_a_busy_machine_is_noticed(monkeypatch, tmp_path):
    """bench and train say when speeds will read low: a load average above the cores, or a matmul measured now
    under half the best the cache holds for this machine."""
    _fresh(monkeypatch, tmp_path, measured=1.14e11)
    cpu = torch.device("cpu")
    device.peak_flops(cpu, torch.float32)  # caches 114 GFLOP/s as this machine's best
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 1.0, 1.0))
    assert device.busy_note(cpu, 1.0e11) is None and device.busy_note(cpu) is None
    note = device.busy_note(cpu, 1.79e10)
    assert note.startswith("this machine is busy (a matmul ran at 17.9 GFLOP/s now, 114.0 at best here)")
    monkeypatch.setattr(os, "getloadavg", lambda: (9.2, 8.0, 5.0))
    assert "load average 9.2 on 2 cores" in device.busy_note(cpu)
    assert device.busy_note(torch.device("meta")) is None  # a GPU's figures are not judged by the CPU's load
