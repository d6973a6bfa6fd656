"""The test set-up a newcomer meets: GPTFORGE_TEST_DATA points the tests at the data, skips for want of it
are counted in one closing line, and the session's temp folder (torchrun's, inductor's) is gone afterwards.
Each case runs pytest on a two-test folder with a copy of our conftest.py."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

PROBE = '''
import os
from pathlib import Path


def test_needs_data(shared_data):
    assert (shared_data / "marker.txt").read_text() == "here"


def test_writes_where_subprocesses_write():
    scratch = Path(os.environ["TMPDIR"])
    (scratch / "torchelastic_probe").mkdir()  # what torchrun leaves behind
    Path(os.environ["PROBE_OUT"]).write_text(f"{scratch}\\n{os.environ['TORCHINDUCTOR_CACHE_DIR']}")
'''


def run_pytest(tmp_path: Path, data_env) -> subprocess.CompletedProcess:
    suite = tmp_path / "repo" / "tests"  # ../shared/data from this "repo" does not exist
    suite.mkdir(parents=True)
    shutil.copy(HERE / "conftest.py", suite / "conftest.py")
    (suite / "test_probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k not in ("GPTFORGE_TEST_DATA", "TORCHINDUCTOR_CACHE_DIR")}
    env["PROBE_OUT"] = str(tmp_path / "probe.txt")
    env["TMPDIR"] = str(tmp_path)  # where the session folder is made, so the check below sees only ours
    if data_env is not None:
        env["GPTFORGE_TEST_DATA"] = str(data_env)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(suite)],
                          capture_output=True, text=True, cwd=suite, env=env, timeout=120)


@pytest.mark.integration
def test_without_data_the_skips_are_counted_in_one_line(tmp_path):
    r = run_pytest(tmp_path, None)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 passed, 1 skipped" in r.stdout
    line = next(line for line in r.stdout.splitlines() if "for want of test data" in line)
    assert line.startswith("1 test skipped") and "point GPTFORGE_TEST_DATA at" in line


@pytest.mark.integration
def test_the_variable_points_the_tests_at_the_data(tmp_path):
    data = tmp_path / "elsewhere"
    data.mkdir()
    (data / "marker.txt").write_text("here")
    r = run_pytest(tmp_path, data)
    assert r.returncode == 0 and "2 passed" in r.stdout, r.stdout + r.stderr
    assert "for want of test data" not in r.stdout


@pytest.mark.integration
def test_a_variable_that_names_no_folder_stops_the_run(tmp_path):
    r = run_pytest(tmp_path, tmp_path / "typo")
    assert r.returncode != 0
    assert f"GPTFORGE_TEST_DATA={tmp_path / 'typo'} is not a directory" in r.stdout + r.stderr


@pytest.mark.integration
def test_the_session_temp_folder_is_removed(tmp_path):
    r = run_pytest(tmp_path, None)
    assert r.returncode == 0, r.stdout + r.stderr
    scratch, inductor = (tmp_path / "probe.txt").read_text().splitlines()
    assert Path(scratch).parent == tmp_path and Path(inductor).parent == Path(scratch)
    assert not Path(scratch).exists()  # with the torchelastic_probe folder in it
    assert not list(tmp_path.glob("gptforge-tests-*"))
