"""The package's module-level imports form no cycle (a cycle makes import order matter and breaks lazily)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gptforge"


def module_graph() -> dict[str, set[str]]:
    """gptforge module -> the gptforge modules it imports at module level (not inside functions)."""
    paths = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        paths[".".join(parts)] = path
    graph: dict[str, set[str]] = {name: set() for name in paths}
    for name, path in paths.items():
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            targets = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("gptforge"):
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for target in targets:
                while target and target not in paths:  # `from gptforge.data import chunks` -> gptforge.data.chunks
                    target = target.rpartition(".")[0]
                if target and target not in (name, "gptforge"):
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    return next((c for n in sorted(graph) if n not in state and (c := visit(n))), None)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_level_import_cycle():
    graph = module_graph()
    assert "gptforge.data.chunks" in graph["gptforge.data.hf_dataset"]  # the graph sees `from X import Y`
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_data_readers_do_not_import_the_dispatcher():
    graph = module_graph()
    for reader in ("text_files", "parquet_files", "hf_dataset", "builtin_sources", "chunks"):
        assert "gptforge.data.sources" not in graph[f"gptforge.data.{reader}"], reader


def test_data_modules_use_no_other_modules_private_names():
    """gptforge.data's modules share what they share under public names (a `_name` is its module's own)."""
    for path in (PACKAGE / "data").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gptforge"):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                assert not private, f"{path.name} imports {private} from {node.module}"


def test_the_eval_extra_installs_what_the_documented_commands_need():
    """`lm_eval --model hf` on an export needs accelerate, which lm-eval[api] does not bring."""
    import re

    import pytest

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.split(r"[\[<>=]", d)[0] for d in extras["eval"]}
    assert {"lm-eval", "accelerate"} <= names
