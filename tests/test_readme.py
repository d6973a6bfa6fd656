"""The README is the user's door: its commands must parse, its presets exist, and CI must run its test command."""

import re
import shlex

import pytest

from conftest import REPO
from gptforge.cli import build_parser, train_defaults
from gptforge.config import PRESETS

README = (REPO / "README.md").read_text()


def readme_commands(verb: str) -> list[list[str]]:
    """Every `gptforge VERB ...` command in the README's code blocks, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    commands = []
    for block in blocks:
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split("#")[0].strip()
            if line.startswith(f"gptforge {verb}"):
                commands.append(shlex.split(line)[1:])
            elif line.startswith("torchrun") and f"-m gptforge {verb}" in line:  # torchrun ... -m gptforge VERB ...
                commands.append(shlex.split(line.split("-m gptforge", 1)[1]))
    return commands


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    test_line = next(line for line in README.splitlines() if "pytest" in line and line.startswith("python3 -m venv"))
    assert test_line in ci


@pytest.mark.parametrize("verb", ["prepare", "train", "eval", "sample", "export", "import", "bench", "chat"])
def test_every_readme_command_parses(verb, tmp_path):
    commands = readme_commands(verb)
    assert commands, f"the README shows no `gptforge {verb}` command"
    nanogpt_config = tmp_path / "train_shakespeare_char.py"  # a nanoGPT config lives in the user's nanoGPT folder
    nanogpt_config.write_text("n_layer = 6\n")
    for argv in commands:
        argv = [a.replace("RUN_DIR", "runs/x").replace("DATA_DIR", "data/x") for a in argv]
        argv = [str(nanogpt_config) if a.startswith("config/") and a.endswith(".py") else a for a in argv]
        build_parser(train_defaults(argv) if verb in ("train", "bench") else None).parse_args(argv)


def test_readme_presets_exist():
    for name in re.findall(r"--preset ([a-z0-9][\w-]*)", README):  # NAME is a placeholder
        assert name in PRESETS, name
    for name in PRESETS:
        assert f"`{name}`" in README, f"preset {name} is not documented in the README"
