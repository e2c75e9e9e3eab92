"""docs/ stays true to the code: line references, metric tables, relative links.

1. Every reference of the form `` `name` (`path.py` lines a-b) `` in docs/*.md names a function or class
   (top level or a method) of that file, and a-b is its whole extent: from its first line (decorators
   included) through its last; a failure prints the current range. Any other "(`x.py` line..."
   spelling is refused, so that no reference escapes the check; README.md holds no line references
   (it links the pages instead).
2. Each script page's "## Logged metrics" table (first column: the key in backticks) lists exactly the
   keys the script logs: a few short toy runs per script, in this process, with the flags that make
   the conditional keys appear; the union of their keys (less `step`) must equal the table's.
3. Every relative link or image in docs/*.md and README.md resolves to an existing file.
"""
from __future__ import annotations

import ast
import importlib
import json
import re
from pathlib import Path

import pytest
import torch

from common.args import cli

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SCRIPTS = ["grpo", "sd", "credit", "antisd", "hsd"]
PAGES = sorted(DOCS.glob("*.md"))

REFERENCE = re.compile(r"`(\w+)`\s+\(`([\w./-]+\.py)`\s+lines\s+(\d+)-(\d+)\)")  # a line break may fall in a gap
LOOSE_REFERENCE = re.compile(r"\(`[^`]+\.py`\s+lines?\b[^)]*\)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


# ---------------------------------------------------------------------------------------------------
# 1. Line references


def definitions(path: Path) -> dict[str, list[tuple[int, int, int]]]:
    """name -> [(first line incl. decorators, `def`/`class` line, last line)] for top-level and class-level defs."""
    found: dict[str, list[tuple[int, int, int]]] = {}

    def add(node: ast.AST) -> None:
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        found.setdefault(node.name, []).append((start, node.lineno, node.end_lineno))

    kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, kinds):
            add(node)
        if isinstance(node, ast.ClassDef):
            for child in node.body:
                if isinstance(child, kinds):
                    add(child)
    return found


def references(text: str) -> list[tuple[str, str, int, int]]:
    return [(m[1], m[2], int(m[3]), int(m[4])) for m in REFERENCE.finditer(text)]


def reference_problem(name: str, file: str, a: int, b: int) -> str | None:
    """Why `name` (`file` lines a-b) is wrong, with the correct range; None when it is right."""
    path = ROOT / file
    if not path.is_file():
        return f"`{file}` does not exist"
    spans = definitions(path).get(name)
    if not spans:
        return f"`{file}` defines no function or class `{name}`"
    if any((a, b) == (start, end) for start, _, end in spans):
        return None
    right = " or ".join(f"lines {start}-{end}" for start, _, end in spans)
    return f"`{name}` (`{file}` lines {a}-{b}) should read `{name}` (`{file}` {right})"


def all_references() -> list[tuple[str, str, str, int, int]]:
    return [(page.name, *ref) for page in PAGES for ref in references(page.read_text())]


def test_docs_exist():
    assert {p.stem for p in PAGES} >= {"index", *SCRIPTS}, "docs/ needs index.md and one page per script"
    assert len(all_references()) >= 5 * len(SCRIPTS), "the pages should point into the code"


def test_line_references_point_at_the_definition():
    problems = [f"docs/{page}: {why}" for page, *ref in all_references() if (why := reference_problem(*ref))]
    assert not problems, "stale line references:\n" + "\n".join(problems)


def test_every_line_reference_uses_the_checked_form():
    bad = []
    for page in PAGES:
        text = page.read_text()
        checked = {m.end() for m in REFERENCE.finditer(text)}
        bad += [f"docs/{page.name}: {m[0]!r} (write `name` (`file.py` lines a-b))"
                for m in LOOSE_REFERENCE.finditer(text) if m.end() not in checked]
    assert not bad, "\n".join(bad)


def test_readme_holds_no_line_references():
    text = (ROOT / "README.md").read_text()
    found = [m[0] for m in LOOSE_REFERENCE.finditer(text)] + [m[0] for m in REFERENCE.finditer(text)]
    assert not found, f"README.md: line references {found}; link the docs page that explains the code instead"


def test_the_reference_checker_catches_a_stale_range():
    assert reference_problem("group_advantages", "grpo.py",
                             *definitions(ROOT / "grpo.py")["group_advantages"][0][::2]) is None
    start, _, end = definitions(ROOT / "grpo.py")["group_advantages"][0]
    message = reference_problem("group_advantages", "grpo.py", start + 1, end)
    assert message and f"lines {start}-{end}" in message
    assert reference_problem("group_advantages", "grpo.py", start, end - 1)  # a sub-range holding the def line
    assert reference_problem("group_advantages", "grpo.py", start - 1, end + 1)  # a range wider than the definition
    assert "defines no" in reference_problem("no_such_function", "grpo.py", 1, 2)
    assert reference_problem("update", "antisd.py",
                             *definitions(ROOT / "antisd.py")["update"][0][::2]) is None  # a method


# ---------------------------------------------------------------------------------------------------
# 2. Metric tables


def documented_keys(script: str) -> set[str]:
    """The first-column keys of the table in docs/{script}.md's "## Logged metrics" section."""
    text = (DOCS / f"{script}.md").read_text()
    section = re.search(r"^## Logged metrics\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert section, f"docs/{script}.md has no '## Logged metrics' section"
    keys = []
    for line in section[1].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if cells and re.fullmatch(r"`[^`]+`", cells[0]):
            keys.append(cells[0].strip("`"))
    assert keys, f"docs/{script}.md: the Logged metrics section holds no table of `keys`"
    assert len(keys) == len(set(keys)), f"docs/{script}.md lists a key twice"
    return set(keys)


# Short toy runs whose union logs every key a script can log: `--beta` for loss/kl, the logit and KL modes for
# loss/distill, a 1-step gate warm-up for gate/h_warm, hsd's diagnostics every step for the _answer_only keys,
# grpo's separate old-policy pass (--ppo-epochs 2) and dynamic sampling, and each SD-frame variant.
FAST = ["--total-steps", "2", "--eval-every", "1", "--eval-size", "8", "--num-prompts", "4", "--group-size", "4",
        "--sample-every", "0"]
CONFIGS = {
    "grpo": [[], ["--beta", "0.1", "--ppo-epochs", "2", "--dynamic-sampling"]],
    "sd": [[], ["--preset", "sdpo", "--beta", "0.1"]],
    "credit": [["--beta", "0.1"]],
    "antisd": [["--gate-warmup-steps", "1", "--beta", "0.1"]],
    "hsd": [["--diagnostics-every", "1"]],
}


def logged_keys(script: str, out: Path) -> set[str]:
    module = importlib.import_module(script)
    keys: set[str] = set()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i, flags in enumerate(CONFIGS[script]):
            run_dir = out / f"{script}-{i}"
            module.main(cli(module.Args, args=[*FAST, "--output-dir", str(run_dir), *flags]))  # as the scripts parse
            for line in (run_dir / "metrics.jsonl").read_text().splitlines():
                keys |= set(json.loads(line))
    finally:
        torch.set_num_threads(threads)
    return keys - {"step"}


@pytest.mark.parametrize("script", SCRIPTS)
def test_metric_table_lists_exactly_the_logged_keys(script, tmp_path):
    documented, logged = documented_keys(script), logged_keys(script, tmp_path)
    missing, stale = sorted(logged - documented), sorted(documented - logged)
    assert not missing and not stale, (f"docs/{script}.md, Logged metrics: logged but not listed {missing}; "
                                       f"listed but never logged by {CONFIGS[script]} {stale}")


# ---------------------------------------------------------------------------------------------------
# 3. Relative links


def relative_links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # links inside code blocks are not links
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:|#", t)]


@pytest.mark.parametrize("page", PAGES + [ROOT / "README.md"], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = [t for t in relative_links(page) if not (page.parent / t.split("#")[0]).exists()]
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


def test_readme_algorithms_table_links_every_page():
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Algorithms\n(.*?)(?=^## |\Z)", text, re.S | re.M)[1]
    links = {t for t in LINK.findall(section)}
    assert {f"docs/{s}.md" for s in SCRIPTS} | {"docs/index.md"} <= links


def test_nothing_points_at_the_shared_specification():
    """The explanations live in docs/: no file sends the reader to the project's unpublished specification."""
    needle = "ALGORITHM" + "S"  # spelled in two parts so that this file does not match itself
    hits = [f"{p.relative_to(ROOT)}:{n}" for pattern in ("*.py", "*.md") for p in ROOT.rglob(pattern)
            if not {".git", ".venv", "runs"} & set(p.relative_to(ROOT).parts)
            for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if needle in line]
    assert not hits, f"references to the shared specification: {hits}"
