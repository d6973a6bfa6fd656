"""The README is the user's door and docs/ the rest: their commands must parse, their presets exist, every
preset be documented, CI must run the README's test command, and the README stay short enough to be a door."""

import json
import re
import shlex
from functools import lru_cache

import pytest

from conftest import REPO
from gptforge.cli import build_parser, train_defaults
from gptforge.config import PRESETS

README = (REPO / "README.md").read_text()
DOCS = {p.relative_to(REPO).as_posix(): p.read_text() for p in sorted((REPO / "docs").rglob("*.md"))}
PAGES = {"README.md": README, **DOCS}  # every page a user reads, by its path in the repository
ALL_TEXT = "\n".join(PAGES.values())
SHELL_FENCES = ("bash", "sh", "shell", "console")


def shell_blocks(text: str) -> list[str]:
    """The bodies of the shell code blocks (```bash, ```sh, ```shell, ```console) of a Markdown text."""
    return [body for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M) if lang in SHELL_FENCES]


def page_commands(text: str, verb: str) -> list[list[str]]:
    """Every `gptforge VERB ...` command in a page's shell blocks, continuation lines joined; a `$ ` prompt
    (a command shown with its output) is dropped, and `torchrun ... -m gptforge VERB ...` counts too."""
    commands = []
    for block in shell_blocks(text):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.strip().removeprefix("$ ")
            line = line.split(" #")[0].strip() if not line.startswith("#") else ""
            line = re.split(r" (?:\||>|&&|;) ", line)[0].removesuffix(" &").strip()  # the command, not the pipe
            if line == f"gptforge {verb}" or line.startswith(f"gptforge {verb} "):
                commands.append(shlex.split(line)[1:])
            elif line.startswith("torchrun") and f"-m gptforge {verb}" in line:  # torchrun ... -m gptforge VERB ...
                commands.append(shlex.split(line.split("-m gptforge", 1)[1]))
    return commands


def readme_commands(verb: str) -> list[list[str]]:
    """Every `gptforge VERB ...` command in the README's and docs/'s shell blocks."""
    return [argv for text in PAGES.values() for argv in page_commands(text, verb)]


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    test_line = next(line for line in README.splitlines() if "pytest" in line and line.startswith("python3 -m venv"))
    assert test_line in ci


def test_the_readme_is_a_door():
    """The README says what gptforge is, how to install it and the common recipes; the rest is in docs/."""
    lines = README.count("\n")
    assert lines < 200, f"README.md is {lines} lines: move the detail into docs/ and link to it"
    for page in re.findall(r"\]\((docs/[^)#]+)", README):
        assert (REPO / page).is_file(), f"README.md links to {page}, which does not exist"


VERBS = ["prepare", "train", "eval", "sample", "export", "import", "bench", "chat", "serve", "quickstart",
         "report", "presets"]


@lru_cache(maxsize=None)
def _parser(defaults: str):
    return build_parser(json.loads(defaults))  # about a second each: one per distinct set of defaults


def parser_for(verb: str, argv: list[str]):
    return _parser(json.dumps(train_defaults(argv) if verb in ("train", "bench") else None, sort_keys=True))


@pytest.mark.parametrize("verb", VERBS)
def test_every_documented_command_parses(verb, tmp_path):
    commands = readme_commands(verb)
    assert commands, f"neither the README nor docs/ shows a `gptforge {verb}` command"
    nanogpt_config = tmp_path / "train_shakespeare_char.py"  # a nanoGPT config lives in the user's nanoGPT folder
    nanogpt_config.write_text("n_layer = 6\n")
    for argv in commands:
        argv = [a.replace("RUN_DIR", "runs/x").replace("DATA_DIR", "data/x") for a in argv]
        argv = [str(nanogpt_config) if a.startswith("config/") and a.endswith(".py") else a for a in argv]
        try:
            parser_for(verb, argv).parse_args(argv)
        except SystemExit as e:
            raise AssertionError(f"`gptforge {shlex.join(argv)}` does not parse (exit {e.code})") from None


def test_the_command_finder_sees_every_kind_of_block():
    page = ("```bash\ngptforge sample a  # note\n$ gptforge sample b\ngptforge sample c \\\n    --top-k 5\n```\n"
            "```console\n$ gptforge sample d | head\n$ gptforge sample e &\n```\n```python\ngptforge sample x\n```\n```\ngptforge sample y\n```\n")
    assert page_commands(page, "sample") == [["sample", "a"], ["sample", "b"], ["sample", "c", "--top-k", "5"],
                                             ["sample", "d"], ["sample", "e"]]


def test_documented_presets_exist():
    for path, text in PAGES.items():
        for name in re.findall(r"--preset ([a-z0-9][\w-]*)", text):  # NAME is a placeholder
            assert name in PRESETS, f"{path} names a preset {name!r} that does not exist"


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_is_documented(name):
    assert f"`{name}`" in ALL_TEXT, f"preset {name} is documented neither in the README nor in docs/"


def test_test_data_is_only_on_the_contributors_page():
    """A user has neither this repository's ../shared/data nor the tests' environment: recipes use what a user
    has (a download, a file they bring); where the test data lives is for contributors."""
    for path, text in PAGES.items():
        if path == "docs/contributing.md":
            continue
        for word in ("shared", "GPTFORGE_TEST_"):
            assert word not in text, f"{path} mentions {word!r}: test data belongs on docs/contributing.md"
