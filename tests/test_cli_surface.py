"""The flag surface of the `gptforge` command is frozen (as torchtitan's test_no_new_cli_options.py does):
every verb's spellings, positionals, choices, defaults and types equal tests/cli_surface.json.

A flag added, removed or respelled on purpose updates the snapshot on purpose:
    python tests/test_cli_surface.py --update
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

SNAPSHOT = Path(__file__).with_name("cli_surface.json")


def _plain(value: Any) -> Any:
    """A default as JSON would keep it (tuples become lists; anything else odd becomes its repr)."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        return repr(value)


def _action(a) -> dict[str, Any]:
    typehint = getattr(a, "_typehint", None)  # jsonargparse's typed actions keep their type here
    kind = ("switch" if a.nargs == 0 else "repeatable" if type(a).__name__ == "_AppendAction"
            else "config" if a.metavar == "CONFIG" else "value")
    out: dict[str, Any] = {"kind": kind}
    if kind != "config":
        out["default"] = _plain(a.default)
    tp = typehint if typehint is not None else a.type
    if tp is not None:
        out["type"] = tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")
    if a.choices is not None:
        out["choices"] = list(a.choices)
    if a.metavar is not None and kind != "config":
        out["metavar"] = str(a.metavar)
    if a.required and a.option_strings:
        out["required"] = True
    return out


def surface(parser) -> dict[str, Any]:
    """{"gptforge": top-level flags and the verbs in order, VERB: {"positionals": [...], "flags": {...}}}."""
    sub = parser._subcommands_action
    top = {"flags": sorted(s for a in parser._actions for s in a.option_strings),
           "verbs": {c.dest: c.help for c in sub._choices_actions}}
    out: dict[str, Any] = {"gptforge": top}
    for verb, p in sub.choices.items():
        positionals = [{"name": a.dest, **_action(a)} for a in p._actions if not a.option_strings]
        flags = {", ".join(a.option_strings): _action(a) for a in p._actions if a.option_strings and a.dest != "help"}
        out[verb] = {"positionals": positionals, "flags": dict(sorted(flags.items()))}
    return out


def dump(s: dict[str, Any]) -> str:
    """The snapshot as JSON with one line per flag, so a diff shows which flag changed."""
    def line(v: Any) -> str:
        return json.dumps(v, ensure_ascii=False)
    verbs = []
    for verb, v in s.items():
        if verb == "gptforge":
            verbs.append(f'  "gptforge": {{"flags": {line(v["flags"])}, "verbs": {{\n' + ",\n".join(
                f"    {line(k)}: {line(h)}" for k, h in v["verbs"].items()) + "}}")
            continue
        rows = [f"      {line(k)}: {line(f)}" for k, f in v["flags"].items()]
        verbs.append(f'  {line(verb)}: {{\n    "positionals": {line(v["positionals"])},\n    "flags": {{'
                     + ("\n" + ",\n".join(rows) + "}}" if rows else "}}"))
    return "{\n" + ",\n".join(verbs) + "\n}\n"


def current() -> dict[str, Any]:
    from gptforge.cli import build_parser

    return surface(build_parser())


def test_the_flag_surface_is_the_snapshot():
    frozen = json.loads(SNAPSHOT.read_text())
    now = current()
    assert list(now) == list(frozen), "the verbs changed"
    for verb in frozen:
        was, new = frozen[verb], now[verb]
        if verb != "gptforge" and was != new:
            flags = set(was["flags"]) | set(new["flags"])
            changed = sorted(f for f in flags if was["flags"].get(f) != new["flags"].get(f))
            changed += ["positionals"] if was["positionals"] != new["positionals"] else []
            pytest.fail(f"`gptforge {verb}` changed: {', '.join(changed)}; if on purpose: "
                        "python tests/test_cli_surface.py --update")
        assert new == was, f"`gptforge {verb}` changed"


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit(__doc__)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    SNAPSHOT.write_text(dump(current()))
    print(f"wrote {SNAPSHOT}")
