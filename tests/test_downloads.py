"""gptforge.downloads: the cache folder, one-line download errors, and atomic cache writes."""

import os

import pytest

from gptforge import downloads
from gptforge.errors import UserError


def test_write_cached_replaces_whole_and_leaves_no_temporary(tmp_path):
    cached = tmp_path / "cache" / "deep" / "file.txt"
    assert downloads.write_cached(cached, b"first") == cached
    downloads.write_cached(cached, b"second")
    assert cached.read_bytes() == b"second"
    assert sorted(p.name for p in cached.parent.iterdir()) == ["file.txt"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_write_cached_to_a_read_only_folder_is_one_line(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(UserError, match="cannot write the download cache .*GPTFORGE_CACHE") as info:
            downloads.write_cached(folder / "x.bin", b"data")
        assert "\n" not in str(info.value)
    finally:
        folder.chmod(0o700)


def test_write_cached_where_a_file_blocks_the_folder_is_one_line(tmp_path):
    (tmp_path / "blocker").write_text("a file, not a folder")
    with pytest.raises(UserError, match="cannot write the download cache") as info:
        downloads.write_cached(tmp_path / "blocker" / "x.bin", b"data")
    assert "\n" not in str(info.value)


def test_download_reads_a_url_and_fails_in_one_line(tmp_path):
    src = tmp_path / "src.txt"
    src.write_bytes(b"payload")
    assert downloads.download(src.as_uri(), "thing", "hint") == b"payload"
    with pytest.raises(UserError) as info:
        downloads.download((tmp_path / "missing").as_uri(), "thing", "pass --file PATH")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("could not download thing from") and msg.endswith("pass --file PATH")
