"""Device and precision in one place: device choice, compute dtype, autocast, TF32, seeding, peak FLOPs, and the
memory a device has free (so a command that cannot fit is refused before it allocates)."""

from __future__ import annotations

import contextlib
import random
import time
from typing import Optional

import numpy as np
import torch

from gptforge.errors import UserError
from gptforge.downloads import cache_dir
from gptforge.files import atomic_write

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str = "auto") -> torch.device:
    """`auto` prefers cuda, then mps, then cpu; an explicit device that is not available is a user error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("device cuda was asked for but no CUDA GPU is available to PyTorch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device {name} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise UserError("device mps was asked for but Apple's Metal backend is not available")
    elif device.type != "cpu":
        raise UserError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype: `auto` is bf16 on CUDA GPUs that support it, fp16 on older ones, fp32 elsewhere."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in _DTYPES:
        raise UserError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16")
    dtype = _DTYPES[name]
    if dtype == torch.float16 and device.type == "cpu":
        raise UserError("float16 is not supported on CPU; use bfloat16 or float32")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed-precision context for forward passes; a no-op for float32. Weights stay float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def setup_backends(device: torch.device) -> None:
    """Allow TF32 matmuls and convolutions on CUDA (Ampere and newer): fp32 accuracy is not needed there."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# What torch.manual_seed and torch.Generator.manual_seed accept: a 64-bit integer, signed or unsigned.
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1


def check_seed(seed: int, what: str = "--seed", count: int = 1, each: str = "sample") -> int:
    """`seed` if it and the `count - 1` seeds after it (one per `each`: sample, choice) are seeds torch
    takes; a UserError naming `what` otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"{what} must be a whole number, got {seed!r}")
    if not SEED_MIN <= seed <= SEED_MAX - (count - 1):
        top = f"{SEED_MAX - (count - 1):,}"
        if count > 1:
            top += f": {count} {each}s take the seeds {what} to {what} + {count - 1}"
        raise UserError(f"{what} must be in [{SEED_MIN:,}, {top}], got {seed:,}")
    return seed


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# Dense (no sparsity) peak tensor-core FLOP/s for bf16/fp16, from the vendors' data sheets.
# Keys are matched against torch.cuda.get_device_name(); the longest matching key wins.
GPU_PEAK_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "A10": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "V100": 125e12,
    "T4": 65e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "RTX A6000": 155e12,
}

_measured_peak: dict[tuple[str, torch.dtype], float] = {}


def peak_flops(device: torch.device, dtype: torch.dtype) -> Optional[float]:
    """Peak FLOP/s to report MFU against: a table for known GPUs, a measured matmul on CPU, else None."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        matches = [k for k in GPU_PEAK_FLOPS if k in name]
        if not matches:
            return None
        peak = GPU_PEAK_FLOPS[max(matches, key=len)]
        return peak / 2 if dtype == torch.float32 else peak  # TF32 runs at half the bf16 rate
    if device.type == "cpu":
        key = (device.type, dtype)
        if key not in _measured_peak:
            cached = _cached_peaks().get(_peak_cache_key(dtype))
            _measured_peak[key] = float(cached) if isinstance(cached, (int, float)) and cached > 0 else \
                measure_peak_flops(device, dtype)
        return _measured_peak[key]
    return None


def measure_peak_flops(device: torch.device, dtype: torch.dtype, rounds: int = 3) -> float:
    """A CPU's peak for MFU: the best of `rounds` separate matmul timings a little apart, so one moment when
    another process held the cores does not set the peak low (and MFU above 100%). The best seen so far on
    this machine is kept in the gptforge cache: measuring takes 0.8 s, a twelfth of a 10-second speedrun's
    training, and a machine's peak does not change between runs (peak_flops reads it back)."""
    best = 0.0
    for _ in range(rounds):
        best = max(best, measure_matmul_flops(device, dtype, seconds=0.15))
        time.sleep(0.05)
    key = (device.type, dtype)
    _measured_peak[key] = max(best, _measured_peak.get(key, 0.0))
    if device.type == "cpu":
        _store_peak(_peak_cache_key(dtype), _measured_peak[key])
    return _measured_peak[key]


def busy_note(device: torch.device, measured: Optional[float] = None,
              dtype: torch.dtype = torch.float32) -> Optional[str]:
    """'this machine is busy (...)' when speeds measured now will read low, else None: on a CPU, a load
    average above its cores, or `measured` (a matmul's FLOP/s just taken) under half the best this machine's
    cache holds. MFU against the cached best then reads low too: the cores are shared, not slower."""
    if device.type != "cpu":
        return None
    import os

    reasons = []
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):  # no load average on this platform
        load = None
    if load is not None and load > cores + 0.5:
        reasons.append(f"load average {load:.1f} on {cores} cores")
    best = _cached_peaks().get(_peak_cache_key(dtype))
    if measured and isinstance(best, (int, float)) and measured < 0.5 * best:
        reasons.append(f"a matmul ran at {measured / 1e9:.1f} GFLOP/s now, {best / 1e9:.1f} at best here")
    if not reasons:
        return None
    return f"this machine is busy ({'; '.join(reasons)}): speeds and MFU measured now read low"


PEAK_CACHE_NAME = "cpu_peak_flops.json"


def _peak_cache_key(dtype: torch.dtype) -> str:
    """What a CPU's matmul peak depends on: the processor, the threads torch uses, the dtype and torch's kernels."""
    import platform

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} | {torch.get_num_threads()} threads | {str(dtype).split('.')[-1]} | torch {torch.__version__}"


def _cached_peaks() -> dict:
    """The cache of measured CPU peaks ({key: FLOP/s}); empty when it is missing or unreadable (then we measure)."""
    import json

    try:
        peaks = json.loads((cache_dir() / PEAK_CACHE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return peaks if isinstance(peaks, dict) else {}


def _store_peak(key: str, flops: float) -> None:
    """Keep the best peak measured for `key`; a cache that cannot be written only means measuring next time."""
    import json

    peaks = _cached_peaks()
    if peaks.get(key, 0) >= flops:
        return
    peaks[key] = flops
    try:
        cache_dir().mkdir(parents=True, exist_ok=True)
        atomic_write(cache_dir() / PEAK_CACHE_NAME, json.dumps(peaks, indent=1) + "\n")
    except OSError:
        pass


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 1024, seconds: float = 0.3) -> float:
    """FLOP/s of a large square matmul on this device and dtype: the best the kernels here can do."""
    g = torch.Generator(device=device).manual_seed(0)  # never touch the global RNG: training depends on it
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    for _ in range(2):  # warm up the kernel and caches
        a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


# ----------------------------------------------------------------------------------------------
# Memory: what a device has free, so a command that cannot fit says so before it allocates


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def _host_available() -> Optional[int]:
    """Bytes this process can still take on the host: the kernel's MemAvailable, or the room left under the
    cgroup (container) limit when that is smaller; None when neither can be read (not Linux)."""
    found: list[int] = []
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and used is not None:  # cgroup v2; "max" (no limit) is not a number
        found.append(max(0, limit - used))
    if not found:
        try:
            import os

            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    return min(found)


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes free for new tensors on `device`: the GPU's free memory on CUDA, the host's elsewhere (an Apple
    GPU shares it); None when this cannot be told."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    return _host_available()


def format_bytes(n: float) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{int(n)} bytes"


def check_memory(need: int, device: torch.device, what: str, fix: str) -> None:
    """Refuse, in one line with the estimate, `what` needing `need` bytes where `device` has less free.
    Estimates are lower bounds; a device whose free memory cannot be read is not refused."""
    free = available_memory(device)
    if free is not None and need > free:
        where = "GPU memory" if device.type == "cuda" else "memory"
        raise UserError(f"{what} needs about {format_bytes(need)}, more than the {format_bytes(free)} of {where} "
                        f"free on this machine ({device.type}); {fix}")

