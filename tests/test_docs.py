"""The documentation site (mkdocs.yml, docs/): it builds with every warning an error, every page is in the
nav, and the tutorial notebook runs from a clean folder and is stored with the outputs the site shows.

After editing docs/tutorial.ipynb, store it executed (the site renders the stored outputs, it runs nothing):

    python tests/test_docs.py --refresh
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
NOTEBOOK = DOCS / "tutorial.ipynb"
PAGE_SUFFIXES = (".md", ".ipynb")
CELL_TIMEOUT_S = 600  # a generous bound for one cell on a loaded CPU; the whole notebook takes about a minute


def nav_pages(nav) -> list[str]:
    """Every page file named in mkdocs.yml's nav (nested sections included), in order."""
    pages = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        if isinstance(value, list):
            pages += nav_pages(value)
        elif isinstance(value, str) and not value.startswith(("http://", "https://")):
            pages.append(value)
    return pages


def mkdocs_config() -> dict:
    import yaml

    return yaml.safe_load((REPO / "mkdocs.yml").read_text())


def test_every_page_is_in_the_nav():
    config = mkdocs_config()
    assert config["docs_dir"] == "docs"
    in_nav = nav_pages(config["nav"])
    assert len(in_nav) == len(set(in_nav)), f"a page is in the nav twice: {in_nav}"
    pages = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*") if p.suffix in PAGE_SUFFIXES)
    missing = sorted(set(pages) - set(in_nav))
    assert not missing, f"pages in docs/ that the nav of mkdocs.yml leaves out (no reader finds them): {missing}"
    absent = sorted(set(in_nav) - set(pages))
    assert not absent, f"the nav of mkdocs.yml names pages that docs/ does not have: {absent}"


def test_the_site_builds_without_a_warning(tmp_path):
    """`mkdocs build --strict`: a broken link or anchor, a page outside the nav, a bad config all fail."""
    try:
        import material  # noqa: F401 - the theme
        import mkdocs  # noqa: F401
    except ImportError as e:
        pytest.fail(f"the docs tools are missing ({e}): pip install -e '.[dev]'")
    site = tmp_path / "site"
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(REPO / "mkdocs.yml"), "--site-dir", str(site)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{log}"
    warnings = [line for line in log.splitlines() if "WARNING" in line]
    assert not warnings, "mkdocs warned:\n" + "\n".join(warnings)
    for page in nav_pages(mkdocs_config()["nav"]):
        html = site / (page.rsplit(".", 1)[0] + "/index.html" if not page.endswith("index.md") else "index.html")
        assert html.is_file(), f"{page} was not built into {html.relative_to(site)}"
    print(f"site built in {time.perf_counter() - t:.1f} s")


def execute_notebook(path: Path, workdir: Path):
    """The notebook at `path`, executed by a fresh kernel in `workdir`; raises CellExecutionError on an error."""
    import nbclient
    import nbformat

    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(workdir)}})
    client.execute()
    return nb


def test_the_tutorial_runs(tmp_path):
    """The tutorial runs, top to bottom, in an empty folder (it makes its own data, offline) without an error."""
    t = time.perf_counter()
    nb = execute_notebook(NOTEBOOK, tmp_path)
    took = time.perf_counter() - t
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
    print(f"the tutorial ran in {took:.1f} s")


def test_the_stored_tutorial_shows_its_outputs():
    """The site renders the stored notebook as it is: every code cell was run, in order, without an error."""
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, "the tutorial has no code"
    counts = [c.get("execution_count") for c in code]
    assert counts == list(range(1, len(code) + 1)), (
        f"the stored tutorial was not run top to bottom (execution counts {counts}): python tests/test_docs.py --refresh")
    for cell in code:
        assert not any(o["output_type"] == "error" for o in cell["outputs"]), "a stored cell shows an error"


def refresh():
    """Execute docs/tutorial.ipynb in a temporary folder and store it with its outputs."""
    import nbformat

    with tempfile.TemporaryDirectory() as work:
        t = time.perf_counter()
        nb = execute_notebook(NOTEBOOK, Path(work))
        print(f"ran in {time.perf_counter() - t:.1f} s")
    for cell in nb.cells:
        cell.metadata.pop("execution", None)  # run times: noise in every diff
        if cell.cell_type == "code":  # a streamed reply arrives a few characters at a time: one block per stream
            merged = []
            for out in cell.outputs:
                if merged and out.output_type == "stream" and merged[-1].output_type == "stream" \
                        and merged[-1].name == out.name:
                    merged[-1].text += out.text
                else:
                    merged.append(out)
            cell.outputs = merged
    nbformat.write(nb, NOTEBOOK)
    print(f"wrote {NOTEBOOK}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--refresh"]:
        sys.exit("usage: python tests/test_docs.py --refresh   (execute docs/tutorial.ipynb and store its outputs)")
    refresh()
