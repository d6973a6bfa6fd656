"""Shared fixtures and session set-up: where the offline test data is, a temp folder the run cleans up,
and one closing line when tests skipped for want of data.

The data folder is $GPTFORGE_TEST_DATA, or ../shared/data from the repo root. Subprocesses (torchrun,
the CLI) and torch.compile write into a per-session temp folder removed at the end: torchrun leaves a
torchelastic_* folder per launch, and inductor's cache (~150 MB) would otherwise stay in /tmp.
"""

import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_ENV = "GPTFORGE_TEST_DATA"
SHARED_DATA = Path(os.environ[DATA_ENV]).expanduser() if os.environ.get(DATA_ENV) else REPO.parent / "shared" / "data"
NO_DATA = "no test data"  # starts every skip for want of data: pytest_terminal_summary counts them by it

_session_tmp: Path | None = None
_saved_env: dict[str, str | None] = {}


def _skip_no_data(why: str):
    pytest.skip(f"{NO_DATA}: {why}")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The offline data folder, or skip the test when there is none."""
    if not SHARED_DATA.is_dir():
        _skip_no_data(f"{SHARED_DATA} not found")
    return SHARED_DATA


@pytest.fixture(scope="session")
def hellaswag_sample(shared_data) -> Path:
    """500 real HellaSwag validation rows (hellaswag_val_sample500.jsonl), or skip the test without them."""
    path = shared_data / "hellaswag_val_sample500.jsonl"
    if not path.is_file():
        _skip_no_data(f"{path} not found")
    return path


@pytest.fixture(scope="session")
def tiktoken_cache(shared_data) -> Path:
    """Point tiktoken at the offline GPT-2 BPE files so get_encoding('gpt2') needs no network."""
    cache = shared_data / "tiktoken_cache"
    if not cache.is_dir():
        _skip_no_data(f"no tiktoken_cache folder in {shared_data}")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    return cache


def pytest_configure(config):
    if os.environ.get(DATA_ENV) and not SHARED_DATA.is_dir():
        raise pytest.UsageError(f"{DATA_ENV}={os.environ[DATA_ENV]} is not a directory")
    global _session_tmp
    # tempfile.mkdtemp fixes this process's temp folder first, so pytest's own tmp_path folders stay where
    # they always are (the last three kept for a look after a failure); only what starts later moves.
    _session_tmp = Path(tempfile.mkdtemp(prefix="gptforge-tests-"))
    moved = {"TMPDIR": str(_session_tmp)}  # subprocesses: torchrun's torchelastic_* folders, their compiles
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:  # a cache the user chose is theirs to keep
        moved["TORCHINDUCTOR_CACHE_DIR"] = str(_session_tmp / "torchinductor")  # read when torch first compiles
    for key, value in moved.items():
        _saved_env[key] = os.environ.get(key)
        os.environ[key] = value


def pytest_unconfigure(config):
    for key, value in _saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if _session_tmp is not None:
        shutil.rmtree(_session_tmp, ignore_errors=True)


def pytest_collection_finish(session):
    # torch.compile imports torch._inductor, which imports torch.utils.mkldnn, whose 14 methods are
    # decorated with the deprecated torch.jit.script_method: 14 DeprecationWarnings charged to whichever
    # test compiles first, about torch's code, not ours. Import it once here with exactly those silenced.
    if "torch" in sys.modules:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.jit.script_method", category=DeprecationWarning)
            import torch.utils.mkldnn  # noqa: F401


def pytest_terminal_summary(terminalreporter):
    skipped = [r for r in terminalreporter.stats.get("skipped", [])
               if isinstance(r.longrepr, tuple) and NO_DATA in str(r.longrepr[2])]
    if skipped:
        terminalreporter.write_line(
            f"{len(skipped)} test{'s' * (len(skipped) > 1)} skipped for want of test data ({SHARED_DATA}); point {DATA_ENV} at a copy of "
            "the shared data folder (tinyshakespeare, tiktoken_cache, HellaSwag) to run them")
