"""The docs stay true to the code: every citation of a docs page (and anchor) resolves, the product never cites the
team's working notes, every registry objective has a section in docs/equations.md that lists its defaults, inputs
and providers, and the runnable snippet of docs/adding-a-method.md runs."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tokenpo.objectives import OBJECTIVES

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EQUATIONS = DOCS / "equations.md"

# Where the product lives. results/ (old executed notebooks) and lib/*.egg-info are not scanned.
SCANNED = ("lib", "README.md", "notebooks", "docs", "benchmarks", "metrics")
TEXT_SUFFIXES = {".py", ".md", ".txt", ".rst", ".toml", ".cfg", ".ini", ".yaml", ".yml", ".json", ".ipynb", ".sh"}

# docs/<file>.md or docs/<file>.md#<anchor>, also as ./docs/… or ../docs/…, not inside a longer word (mydocs/…).
CITATION = re.compile(r"(?<![\w-])docs/([\w\-/]+?)\.md(?:#([\w\-]+))?")
# Markdown links inside docs/: [text](target.md#anchor) or [text](#anchor), relative to the page.
MD_LINK = re.compile(r"\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
TEAM_NOTES = re.compile(r"(?<![\w-])(papers|CONTEXT|DESIGN|anchors|offline-assets)\.md\b", re.IGNORECASE)

# Registry name -> section anchor in docs/equations.md (others: the name itself).
SECTION_OF = {"tdpo1": "tdpo-1-and-tdpo-2", "tdpo2": "tdpo-1-and-tdpo-2", "tis_dpo": "tis-dpo"}
REQUIRED_ANCHORS = ("notation", "dpo", "ipo", "simpo", "dpop", "tdpo-1-and-tdpo-2", "tdpo", "mapo", "sparsepo",
                    "sepo", "fpo", "tis-dpo", "confpo")


# ------------------------------------------------------------------------------------------------ helpers
def github_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: markup stripped, lower-case, punctuation dropped (letters, digits, "_" and "-"
    kept), spaces -> "-"."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)        # links / images -> their text
    text = re.sub(r"<[^>]+>", "", text)                               # inline HTML
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _markdown_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        marker = re.match(r"\s*(```+|~~~+)", line)
        if marker:
            if fence is None:
                fence = marker.group(1)[0] * 3
            elif marker.group(1).startswith(fence):
                fence = None
            continue
        if fence is None:
            yield number, line


def anchors_of(path: Path) -> set[str]:
    """Every anchor a markdown file defines: its headings' GitHub anchors (repeats get -1, -2, …) and explicit
    <a id="…"> / <a name="…"> tags."""
    text = path.read_text(encoding="utf-8")
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in _markdown_lines(text):
        heading = re.match(r"\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            base = github_anchor(heading.group(1))
            count = seen.get(base, 0)
            anchors.add(base if count == 0 else f"{base}-{count}")
            seen[base] = count + 1
    anchors.update(re.findall(r"<a\s+(?:[^>]*\s)?(?:id|name)\s*=\s*[\"']([^\"']+)[\"']", text))
    return anchors


def _text_of(path: Path) -> str:
    if path.suffix == ".ipynb":
        cells = json.loads(path.read_text(encoding="utf-8")).get("cells", [])
        return "\n".join("".join(c.get("source", "")) if isinstance(c.get("source"), list) else c.get("source", "")
                         for c in cells)
    return path.read_text(encoding="utf-8")


def product_files() -> list[Path]:
    files = []
    for entry in SCANNED:
        path = ROOT / entry
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            for file in sorted(path.rglob("*")):
                parts = file.relative_to(ROOT).parts
                if not file.is_file() or file.suffix not in TEXT_SUFFIXES or "__pycache__" in parts \
                        or any(p.endswith(".egg-info") or p.startswith(".") for p in parts):
                    continue
                if entry == "notebooks" and file.suffix != ".ipynb":
                    continue
                files.append(file)
    return files


def _lines(path: Path):
    """(line number, line) of a product file; a notebook's numbers count lines of its joined cell sources."""
    try:
        text = _text_of(path)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return []
    return enumerate(text.splitlines(), 1)


def citations() -> list[tuple[str, str, str | None]]:
    """(where, docs file relative to the repository, anchor or None) for every docs citation in the product."""
    found = []
    for path in product_files():
        rel = path.relative_to(ROOT)
        for number, line in _lines(path):
            for match in CITATION.finditer(line):
                found.append((f"{rel}:{number}", f"docs/{match.group(1)}.md", match.group(2)))
        if path.suffix == ".md" and DOCS in path.parents:
            for number, line in _markdown_lines(path.read_text(encoding="utf-8")):
                for target in MD_LINK.findall(line):
                    if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):     # http:, mailto:, …
                        continue
                    file_part, _, anchor = target.partition("#")
                    if file_part and not file_part.endswith(".md"):
                        continue
                    doc = (path.parent / file_part).resolve() if file_part else path
                    found.append((f"{rel}:{number}", str(doc.relative_to(ROOT)) if doc.is_relative_to(ROOT)
                                  else str(doc), anchor or None))
    return found


def section(anchor: str) -> str:
    """The text of the `## ` section of docs/equations.md whose heading has this anchor (up to the next `## `)."""
    lines = EQUATIONS.read_text(encoding="utf-8").splitlines()
    start = next((i for i, line in enumerate(lines)
                  if line.startswith("## ") and github_anchor(line[3:]) == anchor), None)
    if start is None:
        return ""
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join(lines[start:end])


def value_pattern(name: str, value) -> re.Pattern:
    """`name=value` as written in the docs: True/False, a string with or without quotes, a number in repr or %g form
    (0.1, 50.0 or 50), not followed by more digits."""
    if isinstance(value, bool):
        forms = [str(value)]
    elif isinstance(value, str):
        forms = [f'"{value}"', f"'{value}'", value]
    elif isinstance(value, (int, float)):
        forms = list(dict.fromkeys([repr(value), f"{value:g}"]))
    else:
        forms = [repr(value)]
    alternatives = "|".join(re.escape(f) for f in forms)
    return re.compile(rf"(?<![\w.]){re.escape(name)}\s*=\s*(?:{alternatives})(?![\w]|\.\d)")


# ------------------------------------------------------------------------------------------------ tests
def test_github_anchor_rules():
    assert github_anchor("TDPO-1 and TDPO-2") == "tdpo-1-and-tdpo-2"
    assert github_anchor("TIS-DPO") == "tis-dpo"
    assert github_anchor("Notation") == "notation"
    assert github_anchor("1. The objective: a pure function") == "1-the-objective-a-pure-function"
    assert github_anchor("`sepo` (SePO)") == "sepo-sepo"
    assert github_anchor("Training with a [provider](x.md) of your own") == "training-with-a-provider-of-your-own"


def test_the_scan_finds_the_known_citations():
    """Guards the scanner itself: citations known to exist in the code must be found."""
    found = {(doc, anchor) for _, doc, anchor in citations()}
    assert ("docs/equations.md", "notation") in found
    assert ("docs/equations.md", "sparsepo") in found
    assert ("docs/adding-a-method.md", None) in found
    assert any(where.startswith("notebooks/") for where, _, _ in citations())


def test_every_docs_citation_resolves():
    broken = []
    anchor_cache: dict[str, set[str]] = {}
    for where, doc, anchor in citations():
        path = ROOT / doc
        if not path.is_file():
            broken.append(f"{where}: {doc} does not exist")
            continue
        if anchor is not None:
            anchors = anchor_cache.setdefault(doc, anchors_of(path))
            if anchor not in anchors:
                broken.append(f"{where}: {doc}#{anchor} has no such anchor (known: {', '.join(sorted(anchors))})")
    assert not broken, "unresolved docs citations:\n" + "\n".join(broken)


def test_the_product_never_cites_the_team_notes():
    cited = [f"{path.relative_to(ROOT)}:{number}: {match.group(0)}"
             for path in product_files() for number, line in _lines(path) for match in TEAM_NOTES.finditer(line)]
    assert not cited, ("the product cites internal working notes (cite docs/equations.md or the paper and its "
                       "official code instead):\n" + "\n".join(cited))


def test_equations_page_has_every_section():
    anchors = anchors_of(EQUATIONS)
    missing = [a for a in REQUIRED_ANCHORS if a not in anchors]
    assert not missing, f"docs/equations.md lacks the anchors {missing}"


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_objective_has_a_section_with_its_defaults(name):
    objective = OBJECTIVES[name]
    anchor = SECTION_OF.get(name, name)
    text = section(anchor)
    assert text, f"objective {name!r} has no section '## …' with anchor #{anchor} in docs/equations.md"
    missing = [f"{key}={value!r}" for key, value in objective.defaults.items()
               if not value_pattern(key, value).search(text)]
    assert not missing, (f"docs/equations.md#{anchor} does not state the registry defaults {missing} of {name!r} "
                         "(write them as name=value)")
    names = [n for n in (*objective.extra_inputs, *objective.optional_inputs, *objective.providers)
             if not re.search(rf"(?<![\w]){re.escape(n)}(?![\w])", text)]
    assert not names, f"docs/equations.md#{anchor} does not mention the inputs/providers {names} of {name!r}"
    assert re.search(rf"`{re.escape(objective.fn.__name__)}\(", text), \
        f"docs/equations.md#{anchor} does not show the signature of {objective.fn.__name__}"


def test_value_pattern_is_strict():
    assert value_pattern("beta", 0.1).search("`beta=0.1`, ")
    assert value_pattern("beta", 0.1).search("beta=0.1.")
    assert not value_pattern("beta", 0.1).search("beta=0.15")
    assert not value_pattern("beta", 0.1).search("xbeta=0.1")
    assert value_pattern("lambda_", 50.0).search("lambda_=50.0")
    assert value_pattern("lambda_", 50.0).search("lambda_=50")
    assert not value_pattern("k", 50).search("k=500")
    assert value_pattern("normalization", "selected").search('normalization="selected"')
    assert value_pattern("common", True).search("common=True")


@pytest.mark.usefixtures("one_thread")
def test_the_provider_snippet_in_adding_a_method_runs(tmp_path, monkeypatch):
    text = (DOCS / "adding-a-method.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- runnable -->\s*```python\n(.*?)```", text, re.DOTALL)
    assert match, "docs/adding-a-method.md lost its runnable snippet (<!-- runnable --> before a python block)"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "docs_snippet"}
    exec(compile(match.group(1), "docs/adding-a-method.md", "exec"), namespace)
    result = namespace["result"]
    assert result.steps == 2 and len(result.history) == 2
    assert all(row["loss"] == row["loss"] for row in result.history)             # finite, not NaN
    assert 0.5 < result.history[-1]["mask/mean_reward_chosen"] < 1.0            # the rule's weights reached the loss


# ------------------------------------------------------------------------------------------------ notebooks
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
EXECUTED = sorted((ROOT / "results").glob("*/[0-9][0-9]_*.ipynb"))
MACHINE_PATH = re.compile(r"(/work/|/home/|/root/|/tmp/|/Users/|/private/var/|PosixPath\()")


def _output_texts(notebook: Path) -> list[tuple[str, str]]:
    """(output type, text) of every output of an executed notebook: streams, and the text forms of rich outputs."""
    texts = []
    for cell in json.loads(notebook.read_text())["cells"]:
        for output in cell.get("outputs", []):
            if output["output_type"] == "stream":
                texts.append(("stream", "".join(output["text"])))
            texts += [(output["output_type"], "".join(v) if isinstance(v, list) else str(v))
                      for k, v in output.get("data", {}).items() if k.startswith("text/")]
    return texts


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_run_on_the_project_kernel(notebook):
    assert json.loads(notebook.read_text())["metadata"]["kernelspec"]["name"] == "tokenpo"


@pytest.mark.parametrize("notebook", EXECUTED, ids=lambda p: p.parent.name)
def test_executed_notebooks_hold_no_machine_paths_or_text_progress_bars(notebook):
    texts = _output_texts(notebook)
    assert not [t[:200] for _, t in texts if str(ROOT) in t or MACHINE_PATH.search(t)]
    # progress bars are widgets (ipywidgets is a dependency), never text redrawn into the stored output
    assert not [t[:200] for kind, t in texts if kind == "stream" and re.search(r"\|\s*\d+/\d+ \[", t)]
