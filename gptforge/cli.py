"""The `gptforge` command: parses arguments and calls one function per verb; no logic of its own.

Each verb is a function in `gptforge.verbs`; jsonargparse builds its subcommand from the function's
signature and docstring (`add_function_arguments`: types, defaults, help). `_VerbParser` keeps the
command's own spelling and argparse's habits for those flags: `--max-new-tokens` for `max_new_tokens`, a
bool defaulting to False is a switch, a str is taken as typed, a Literal is a choice, a list is a repeatable
flag; `SHORT` and `METAVAR` add what a signature cannot say (`-p`, `ORIGIN`). The `train` and `bench`
config flags come from the config dataclasses (`--model.n_layer 4`, `--train.max_iters 2000`, ...). Their
defaults are layered: dataclass defaults < `--preset` < `--config FILE` < flags, whatever the order on the
command line; with `--resume RUN_DIR` the run's saved config is the base (`config.layered_defaults` builds
the base; `train_defaults` only finds the flags that choose it, before the parse).
User mistakes end in one line on stderr and exit status 2.
"""

from __future__ import annotations

import difflib
import re
import sys
import typing
from typing import Any, Callable, Literal, Optional

import docstring_parser
from jsonargparse import ActionSubCommands, ArgumentParser, DefaultHelpFormatter, set_parsing_settings

from gptforge import __version__, verbs
from gptforge.config import EvalConfig, GPTConfig, LoRAConfig, OptimConfig, RunConfig, TrainConfig, layered_defaults
from gptforge.errors import UserError, one_line

set_parsing_settings(docstring_parse_attribute_docstrings=True)

DESCRIPTION = "Train GPT-style language models from scratch: prepare -> train -> eval -> sample, and fine-tune them into a chat model."

# verb -> (function, the line `gptforge --help` lists it with)
VERBS: dict[str, tuple[Callable[..., int], str]] = {
    "prepare": (verbs.prepare, "tokenize a corpus into token shards"),
    "train": (verbs.train, "train a model"),
    "eval": (verbs.eval_, "evaluate a checkpoint"),
    "report": (verbs.report, "plot and summarise a training run"),
    "sample": (verbs.sample, "generate text"),
    "chat": (verbs.chat, "talk to a chat model"),
    "serve": (verbs.serve, "serve a model over an OpenAI-compatible HTTP API"),
    "export": (verbs.export, "export a checkpoint for Hugging Face transformers or llama.cpp (GGUF)"),
    "import": (verbs.import_, "import GPT-2, a Hugging Face model, a GGUF file or a nanoGPT ckpt.pt as a checkpoint"),
    "quickstart": (verbs.quickstart, "the whole pipeline in one command, offline, on CPU"),
    "bench": (verbs.bench, "measure training and decoding speed on this machine"),
    "presets": (verbs.presets, "list presets"),
}
# the config dataclasses whose fields are `--section.field` flags, for the verbs that take them
SECTIONS = {"model": GPTConfig, "optim": OptimConfig, "train": TrainConfig, "eval": EvalConfig, "lora": LoRAConfig}
CONFIG_FLAGS = {"train": ("model", "optim", "train", "eval", "lora"), "bench": ("model", "optim", "train")}
SHORT = {("chat", "prompt"): "-p", ("train", "verbose"): "-v", ("train", "quiet"): "-q"}
METAVAR = {("serve", "cors"): "ORIGIN", ("quickstart", "time_budget"): "SECONDS"}


def flag(name: str) -> str:
    """The command-line spelling of a parameter: `max_new_tokens` -> `--max-new-tokens` (config fields keep
    theirs: `--model.n_layer`, as in config files)."""
    return "--" + (name if "." in name else name.replace("_", "-"))


class _HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help, less the "(required)" it gives the verb list, printed alone on a line under
    "Available subcommands:" (the verbs are listed right below; a missing one is an error of its own), and
    less its "default: X" where the help already says the default in words ("(default: this machine only)")."""

    def _get_help_string(self, action) -> str:
        if isinstance(action, ActionSubCommands):
            return action.help or ""
        text = super()._get_help_string(action)
        own = action.help or ""
        if "default" not in own or not text.startswith(own):
            return text
        tail = re.sub(r"(, )?default: %\(default\)s", "", text[len(own):]).replace("(, ", "(")
        return own + ("" if tail.strip() == "()" else tail)


class _VerbParser(ArgumentParser):
    """One verb's parser: jsonargparse adds an argument per parameter of the verb function; `add_argument`
    says each as the command always has (see the module docstring)."""

    verb = ""
    hints: dict[str, Any] = {}  # the verb function's parameters (not its config sections) and their types

    def add_argument(self, *args, **kw):
        # jsonargparse gives argument groups (the config sections) this method too, without these attributes
        verb, hints = getattr(self, "verb", ""), getattr(self, "hints", {})
        name = args[0].lstrip("-") if args else ""
        if name not in hints:  # --help, a config section's flags
            return super().add_argument(*args, **kw)
        hint = hints[name]
        if typing.get_origin(hint) is typing.Union:  # Optional[X] is said as X is
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        plain = {bool: {"action": "store_true"}, str: {}}.get(hint)
        if typing.get_origin(hint) is Literal:
            plain = {"choices": list(typing.get_args(hint))}
        elif typing.get_origin(hint) is list:
            plain = {"action": "append"}
        if plain is not None:  # argparse's own action (and messages) instead of jsonargparse's typed one
            kw = {k: v for k, v in kw.items() if k not in ("type", "action")} | plain
        if (verb, name) in METAVAR:
            kw["metavar"] = METAVAR[verb, name]
        spellings = [SHORT[verb, name]] if (verb, name) in SHORT else []
        positional = not args[0].startswith("-")
        return super().add_argument(*(args[:1] if positional else [*spellings, flag(name)]), **kw)


def _verb_parser(verb: str, defaults: dict[str, Any]) -> ArgumentParser:
    """The subcommand for `VERBS[verb]`, its description the docstring's text above Args."""
    fn, sections = VERBS[verb][0], CONFIG_FLAGS.get(verb, ())
    doc = docstring_parser.parse(fn.__doc__ or "")
    description = " ".join(filter(None, (doc.short_description, doc.long_description)))
    p = _VerbParser(exit_on_error=False, description=" ".join(description.split()), formatter_class=_HelpFormatter)
    p.verb = verb
    skip = {*sections, "base"} if sections else set()  # base: the layered defaults, handed over by main
    p.hints = {k: v for k, v in typing.get_type_hints(fn).items() if k not in skip and k != "return"}
    p.add_function_arguments(fn, as_positional=True, as_group=False, skip=skip)
    for key in sections:
        p.add_class_arguments(SECTIONS[key], key)
    p.set_defaults({f"{key}.{k}": v for key in sections for k, v in defaults[key].items()})
    if verb == "train":
        p.set_defaults(data=defaults["data"]["dir"] or None)
    return p


def build_parser(train_defaults_: Optional[dict[str, Any]] = None, only: Optional[str] = None) -> ArgumentParser:
    """The `gptforge` parser; with `only` (a verb the command line names), that verb's subcommand alone: building
    all twelve took 0.33 s of a 4 s speedrun process, time a short training budget loses."""
    parser = ArgumentParser(exit_on_error=False, prog="gptforge", description=DESCRIPTION,
                            formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"gptforge {__version__}")
    subcommands = parser.add_subcommands(dest="verb")
    defaults = train_defaults_ or RunConfig().to_dict()
    for verb, (_, help_text) in VERBS.items():
        if only is not None and verb != only:
            continue
        subcommands.add_subcommand(verb, _verb_parser(verb, defaults), help=help_text)
    return parser


# ---------------------------------------------------------------------------------------------
# Layered defaults for `train` and `bench`: read before the parse, as the flags' defaults


def _flag_value(argv: list[str], name: str) -> Optional[str]:
    """The value of `name` in argv (`--flag V` or `--flag=V`)."""
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a[len(name) + 1:]
    return None


def train_defaults(argv: list[str]) -> dict[str, Any]:
    """The config that flags override (see `config.layered_defaults`), from the flags that choose it."""
    return layered_defaults(_flag_value(argv, "--preset"), _flag_value(argv, "--config"), _flag_value(argv, "--resume"))


def _arguments(verb: str, ns, argv: list[str], defaults: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The verb function's keyword arguments: its flags, and for `train` and `bench` the layered defaults
    (read once). `bench` measures the model the command line names (a preset, a config file or --model
    flags), else its default shapes: without --model flags it gets no model."""
    kwargs = ns.get(verb).as_dict()
    if verb in CONFIG_FLAGS:
        kwargs["base"] = defaults
    if verb == "bench" and not any(x.startswith("--model") for x in argv):
        kwargs["model"] = None
    return kwargs


# ---------------------------------------------------------------------------------------------
# Errors


def _did_you_mean(word: str, options: list[str]) -> Optional[str]:
    """The option (or verb) the user probably meant: `--model.nlayer` -> `--model.n_layer`, `--lr` ->
    `--optim.lr` (a config field's name without its section), `trian` -> `train`."""
    tails = {"--" + o.split(".", 1)[1]: o for o in options if o.startswith("--") and "." in o}
    if word in tails:
        return tails[word]
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.75)
    if close:
        return close[0]
    close = difflib.get_close_matches(word, list(tails), n=1, cutoff=0.75)
    return tails[close[0]] if close else None


def _suggestion(msg: str, parser: Optional[ArgumentParser], verb: str) -> str:
    """' (did you mean --model.n_layer?)' for an unknown flag or verb, else ''."""
    if parser is None:
        return ""
    unknown = re.match(r"unrecognized arguments: (\S+)", msg)
    choice = re.match(r"argument verb: invalid choice: '([^']*)'", msg)
    if unknown and verb in VERBS:
        flags = [o for o in parser._subcommands_action.choices[verb]._option_string_actions if o.startswith("--")]
        word, options = unknown.group(1).split("=", 1)[0], flags
    elif choice:
        word, options = choice.group(1), list(VERBS)
    else:
        return ""
    guess = _did_you_mean(word, options)
    return f" (did you mean {guess}?)" if guess else ""


def _argument_error(msg: str) -> str:
    """jsonargparse's type errors, said as a user would: `--model.n_layer expects int, got 'abc'`."""
    msg = one_line(msg)
    m = re.match(r'Parser key "([^"]+)":\s*Expected a (.+?)\. Got value: (.*)$', msg)
    union = re.match(r'Parser key "([^"]+)":.*Union subtypes Subtypes: \[(.*?)\].*Given value: (.*)$', msg)
    if union is not None:
        key, types, got = union.groups()
        names = re.findall(r"<class '(\w+)'>", types)
        expected = " or ".join("null" if n == "NoneType" else n for n in names)
        return f"{flag(key)} expects {expected}, got {got!r}"
    if m is None:
        return msg
    key, expected, got = m.groups()
    expected = re.sub(r"<class '(\w+)'>", r"\1", expected).replace("typing.", "")
    return f"{flag(key)} expects {expected}, got {got!r}"


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = None
    try:
        defaults = None
        if argv[:1] == ["train"]:
            defaults = train_defaults(argv)
        elif argv[:1] == ["bench"]:  # the same layering; bench has no --resume, so the parser refuses one
            defaults = train_defaults([x for x in argv if not x.startswith("--resume")])
        parser = build_parser(defaults, only=argv[0] if argv[:1] and argv[0] in VERBS else None)
        args = parser.parse_args(argv)
        return VERBS[args.verb][0](**_arguments(args.verb, args, argv, defaults))
    except UserError as e:
        print(f"gptforge: error: {one_line(e)}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help and --version
        return int(e.code or 0)
    except KeyboardInterrupt as e:  # a second Ctrl-C / SIGTERM while stopping: 128 + the signal's number
        print("gptforge: interrupted", file=sys.stderr)
        return 128 + getattr(e, "signum", 2)
    except OSError as e:  # a backstop: a path the verb did not check (unwritable, missing, disk full) is the user's
        where = f": {e.filename}" if e.filename else ""
        print(f"gptforge: error: {e.strerror or one_line(e)}{where}", file=sys.stderr)
        return 2
    except Exception as e:  # argument errors from the parser
        from argparse import ArgumentError

        if isinstance(e, ArgumentError) or type(e).__name__ == "ArgumentError":
            msg = _argument_error(str(e))
            print(f"gptforge: error: {msg}{_suggestion(msg, parser, argv[0] if argv else '')}", file=sys.stderr)
            return 2
        raise


def lm_eval_main() -> int:
    """`gptforge-lm-eval`: lm-eval's own command line with the gptforge model registered (gptforge.harness.main).
    A missing lm-eval, or a user mistake the gptforge model finds, ends in one line, as in `gptforge`."""
    try:
        from gptforge import harness

        harness.main()
    except UserError as e:
        print(f"gptforge-lm-eval: error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
