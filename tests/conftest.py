"""Shared fixtures: the offline data folder (../shared/data from the repo root) and tiny configs."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or skip the test when this checkout has no such folder."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiktoken_cache(shared_data) -> Path:
    """Point tiktoken at the offline GPT-2 BPE files so get_encoding('gpt2') needs no network."""
    cache = shared_data / "tiktoken_cache"
    if not cache.is_dir():
        pytest.skip("no tiktoken cache in shared data")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    return cache
