"""`--help` is read by people deciding what to type: no stray lines, and every config flag says what it does."""

import re

import pytest

from gptforge.cli import build_parser

# "--flag METAVAR", "--flag {a,b}" or "-x, --flag METAVAR": what follows is the flag's description
FLAG = re.compile(r"^-\S+(?: [A-Z][A-Z0-9_]*| \{[^}]*\})?(?:, --?\S+(?: [A-Z][A-Z0-9_]*)?)?")


def help_text(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_main_help_lists_the_verbs_without_a_stray_required_line(capsys):
    out = help_text(capsys)
    assert "(required)" not in out
    listed = re.search(r"Available subcommands:\n((?:    .*\n)+)", out).group(1)
    assert [line.split()[0] for line in listed.splitlines()][:3] == ["prepare", "train", "eval"]


@pytest.mark.parametrize("verb", ["prepare", "train", "eval", "report", "sample", "export", "import", "quickstart", "bench"])
def test_every_flag_has_a_description(capsys, verb):
    out = help_text(capsys, verb)
    entries = re.split(r"\n(?=  -)", out.split("\noptions:\n", 1)[1])  # one entry per flag, wrapped lines joined
    bare = []
    for entry in entries:
        flag = entry.split()[0].rstrip(",")
        description = FLAG.sub("", " ".join(entry.split())).strip()  # then "(type: ..., default: ...)"
        if not description or description.startswith("("):
            bare.append(flag)
    assert bare == [], f"gptforge {verb} --help: no description for {bare}"


@pytest.mark.parametrize("verb", ["prepare", "train", "eval", "sample", "chat", "serve", "export", "quickstart", "bench"])
def test_a_default_is_said_once(capsys, verb):
    """A flag whose description says its default in words ("(default: this machine only)") does not get
    jsonargparse's "(default: 127.0.0.1)" after it as well."""
    out = help_text(capsys, verb)
    entries = re.split(r"\n(?=  -)", out.split("\noptions:\n", 1)[1])
    twice = [entry.split()[0] for entry in entries if " ".join(entry.split()).count("default") > 1]
    assert twice == [], f"gptforge {verb} --help says a default twice for {twice}"


def test_prepare_help_names_the_json_conversations():
    from gptforge.verbs import prepare

    assert ".json(.gz) (a JSON array" in prepare.__doc__
