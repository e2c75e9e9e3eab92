"""Layout rules: each script stands alone, `common/` has no import cycle and no code in strings, marked copies
match their source.

A script imports only the standard library, third-party packages and `common/`; a small pure function
that two scripts need is copied under a marker line `# Same as grpo.py: group_advantages`, and this
test fails when a copy's source text differs from the original (as transformers' `check_copies.py`
does for its `# Copied from` blocks).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["grpo", "sd", "credit", "antisd", "hsd"]
MARKER = re.compile(r"^# Same as (\w+)\.py: (\w+)$")
LONG_STRING = 400
"""Longest string literal allowed in common/ (docstrings aside): anything longer is code or data for a file."""


def imported_modules(path: Path) -> set[str]:
    """Every module an `import` or `from ... import` anywhere in the file names (function-level ones too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            if node.module == "common":  # `from common import toy` imports common.toy
                names |= {f"common.{alias.name}" for alias in node.names}
    return names


def common_modules() -> dict[str, Path]:
    """common.<module> (subpackages included: common/sandbox/__init__.py is common.sandbox) -> its file."""
    modules = {}
    for path in sorted((ROOT / "common").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name != "common":
            modules[name] = path
    return modules


def common_graph() -> dict[str, set[str]]:
    """common.<module> -> the common modules it imports."""
    modules = common_modules()
    return {name: {m for m in imported_modules(path) if m in modules} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, stack + [nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_common_has_no_import_cycle():
    graph = common_graph()
    assert "common.toy" in graph["common.data"] or "common.toy" in graph["common.models"]  # lazy imports count
    assert find_cycle(graph) is None, f"import cycle in common/: {' -> '.join(find_cycle(graph))}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_imports_no_other_script(script):
    bad = {m.split(".")[0] for m in imported_modules(ROOT / f"{script}.py")} & set(SCRIPTS)
    assert not bad, f"{script}.py imports {sorted(bad)}: copy the function under a `# Same as` marker instead"


def test_common_imports_no_script():
    for path in (ROOT / "common").rglob("*.py"):
        assert not {m.split(".")[0] for m in imported_modules(path)} & set(SCRIPTS), path.name


def long_strings(path: Path, limit: int = LONG_STRING) -> list[tuple[int, int]]:
    """(line, length) of each string literal in `path` longer than `limit`, docstrings (of modules, classes,
    functions and attributes: a string standing alone as a statement) aside."""
    tree = ast.parse(path.read_text())
    standalone = {id(node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}
    return [(node.lineno, len(node.value)) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and len(node.value) > limit
            and id(node) not in standalone]


def test_no_source_code_in_strings():
    """Code lives in .py files, where it is linted and highlighted: no long string literal in common/ (the code
    sandbox's child is common/sandbox/harness.py, whose text the parent reads, not a string in a module)."""
    found = {str(path.relative_to(ROOT)): hits for path in sorted((ROOT / "common").rglob("*.py"))
             if (hits := long_strings(path))}
    assert not found, f"string literals over {LONG_STRING} characters (line, length): {found}"


def test_a_long_string_is_caught(tmp_path):
    module = tmp_path / "m.py"
    code = "x = 1\n" * 100
    module.write_text(f'"""{"doc " * 200}"""\nX = 1\n"""{"attribute doc " * 50}"""\nCODE = {code!r}\n')
    assert long_strings(module) == [(4, 600)]


def top_level_source(path: Path, name: str) -> str | None:
    """The source text of the top-level function or class `name` (decorators included), or None."""
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    for node in ast.parse(text).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            return "".join(lines[start - 1:node.end_lineno])
    return None


def marked_copies(root: Path = ROOT) -> list[tuple[str, int, str, str]]:
    """(script, line, source script, name) for every marker line in the scripts under `root`."""
    found = []
    for script in SCRIPTS:
        for i, line in enumerate((root / f"{script}.py").read_text().splitlines(), 1):
            if line.startswith("# Same as"):
                m = MARKER.match(line)
                assert m, f"{script}.py:{i}: malformed marker {line!r} (expected `# Same as file.py: name`)"
                found.append((script, i, m[1], m[2]))
    return found


def copy_problem(root: Path, script: str, line: int, source: str, name: str) -> str | None:
    """Why the copy marked at `script.py:line` is not an exact copy of `source.py`'s `name`, or None."""
    path = root / f"{script}.py"
    node = next((n for n in ast.parse(path.read_text()).body if n.lineno > line), None)
    if node is None or getattr(node, "name", None) != name:
        return f"{script}.py:{line}: the marker must sit right above `def {name}`"
    if min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) != line + 1:
        return f"{script}.py:{line}: the marker must be the line right above `{name}`"
    original = top_level_source(root / f"{source}.py", name)
    if original is None:
        return f"{source}.py has no top-level {name}"
    if top_level_source(path, name) != original:
        return f"{script}.py:{line}: {name} differs from {source}.py's; change every copy together"
    return None


def test_there_are_marked_copies():
    copies = {(s, name) for s, _, _, name in marked_copies()}
    assert ("sd", "group_advantages") in copies and ("credit", "distillation_loss") in copies


@pytest.mark.parametrize("script", SCRIPTS)
def test_marked_copies_sit_in_one_block_after_main(script):
    """A reader meets the algorithm's own functions and main() first; the copies follow, together, at the end."""
    body = ast.parse((ROOT / f"{script}.py").read_text()).body
    defs = [n.name for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    copies = {name for s, _, _, name in marked_copies() if s == script}
    assert defs[len(defs) - len(copies):] == [d for d in defs if d in copies]
    assert copies <= set(defs[defs.index("main") + 1:])


@pytest.mark.parametrize("script,line,source,name", marked_copies())
def test_marked_copy_matches_its_source(script, line, source, name):
    assert copy_problem(ROOT, script, line, source, name) is None, copy_problem(ROOT, script, line, source, name)


def test_a_drifted_copy_is_caught(tmp_path):
    for script in SCRIPTS:
        (tmp_path / f"{script}.py").write_text((ROOT / f"{script}.py").read_text())
    sd = tmp_path / "sd.py"
    sd.write_text(sd.read_text().replace("centred / (grouped.std(dim=1, keepdim=True) + 1e-4)",
                                         "centred / (grouped.std(dim=1, keepdim=True) + 1e-6)"))
    problems = [copy_problem(tmp_path, *c) for c in marked_copies(tmp_path)]
    assert [p for p in problems if p] == [p for p in problems if p and "sd.py" in p and "group_advantages" in p] != []
