"""The README and docs/ name only files that exist: every repository path in backticks or as a link target.

A path is a word with a `/` or a known file extension (`service/engine/scheduler.py`, `bench/throughput.py`,
`docs/CONFIGURATION.md`); a test id (`tests/model/test_stops.py::test_x`) must name a test of that file,
an installed module path (`charrnn.service.engine.batch`) a module of the repository, and a module is named
by its installed name (`charrnn.model.stops`, not `model.stops`). Backtick paths
resolve from the repository root (or the doc's folder), link targets from the doc's folder. Skipped:
URLs, URL paths (`/v1/completions`), globs, placeholders (`NAME.safetensors`, `<dir>`, `$VAR/x`), and
what a user or a command makes (`runs/`, `~/.cache`, `/tmp`, `/models`, ...). Fenced code blocks are
commands and examples, not references, and are not read.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [path for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]]

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
EXTENSIONS = {".py", ".md", ".c", ".h", ".toml", ".yml", ".yaml", ".sh", ".conf", ".cfg", ".html", ".css", ".js"}
# What a user or a command makes, not the repository: run directories, exports, test artifacts, caches.
MADE_ELSEWHERE = ("runs/", "models/", "texts/", "tests/artifacts/", ".venv", "build/")
FOLDERS = ("model", "service", "corpora")  # installed as charrnn.model, charrnn.service, charrnn.corpora
MODULE = re.compile(r"(?<![\w.])charrnn(\.[A-Za-z_]\w*)+")
# A module named as before the layout (model.stops, service.app): installed, it is charrnn.model.stops, ...
OLD_MODULE = re.compile(r"^(model|service|corpora)(\.[A-Za-z_]\w*)+$")
DATA_FILES = {".safetensors", ".json", ".jsonl", ".txt", ".pt", ".png", ".pkl", ".bin"}


def references(doc: Path) -> list[tuple[str, str]]:
    """(kind, word) for every candidate reference of a doc: 'code' words of inline code, 'link' targets."""
    text = FENCE.sub("", doc.read_text(encoding="utf-8"))
    found = [("link", target) for target in LINK.findall(text)]
    for span in CODE_SPAN.findall(text):
        found += [("code", word.strip("\"'(),;:[]")) for word in span.split()]
    return found


def is_placeholder(word: str) -> bool:
    """NAME.safetensors, DIR/best.safetensors, <dir>, $VAR/x, a glob: a pattern, not a file."""
    if any(mark in word for mark in "*<>${}=|"):
        return True
    return any(
        re.fullmatch(r"[A-Z][A-Z0-9_]*", part.split(".", 1)[0]) and not part.endswith(".md") for part in word.split("/")
    )


def as_path(kind: str, word: str) -> str | None:
    """The repository path a word names, or None when it names none (a URL, a flag, a placeholder...)."""
    if kind == "link":
        word = word.split("#", 1)[0]
        if not word or re.match(r"^[a-z][a-z0-9+.-]*:", word):  # an anchor in the same doc, or a URL
            return None
    word = word.split("::", 1)[0].removeprefix("./")
    if not word or "://" in word or word.startswith(("/", "~", "-", "...", "python:")) or is_placeholder(word):
        return None
    if word.startswith(MADE_ELSEWHERE):
        return None
    if kind == "link" or "/" in word:
        return word if re.fullmatch(r"[\w./-]+", word) else None
    return word if Path(word).suffix in EXTENSIONS else None


def anchors(doc: Path) -> set[str]:
    """The anchors of a doc's headings, as GitHub makes them: "## One worker or two" -> one-worker-or-two."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", doc.read_text(encoding="utf-8")), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def resolve(doc: Path, kind: str, path: str) -> Path | None:
    """Where `path` is: a link from the doc's folder, a code word from the root or the doc's folder; None if nowhere."""
    bases = [doc.parent] if kind == "link" else [REPO, doc.parent]
    return next((base / path for base in bases if (base / path).exists()), None)


def module_exists(dotted: str) -> bool:
    """Whether an installed name is a module of the repository or a name one defines: charrnn.model.vocab,
    charrnn.service.engine.batch.NativeLSTMBatch (its first name after the module is looked for)."""
    names = dotted.split(".")[1:]  # after "charrnn"
    source = REPO / "charrnn" / "__init__.py"
    if names and names[0] in FOLDERS:  # charrnn.model is the repository's model/, ...
        source, names = REPO / names[0] / "__init__.py", names[1:]
    for name in names:
        package = source.parent
        if source.name == "__init__.py" and (package / name / "__init__.py").exists():
            source = package / name / "__init__.py"
        elif source.name == "__init__.py" and (package / f"{name}.py").exists():
            source = package / f"{name}.py"
        else:
            return re.search(rf"\b{re.escape(name)}\b", source.read_text(encoding="utf-8")) is not None
    return True


def broken(doc: Path) -> list[str]:
    """What the doc names that is not in the repository, one line each."""
    problems = []
    for kind, word in references(doc):
        path = as_path(kind, word)
        found = None if path is None else resolve(doc, kind, path)
        if path is not None and found is None:
            problems.append(f"{kind} {word!r}: no such file or directory")
        elif found is not None and "::" in word:
            test = word.split("::", 1)[1].split("[", 1)[0]
            if not re.search(rf"^\s*(async )?def {re.escape(test)}\b", found.read_text(encoding="utf-8"), re.MULTILINE):
                problems.append(f"{kind} {word!r}: no test {test} in {path}")
        target, _, anchor = word.partition("#") if kind == "link" else (word, "", "")
        linked = doc if not target else found  # the doc an anchor points into; None: no such file
        if anchor and linked is not None and linked.suffix == ".md" and anchor not in anchors(linked):
            problems.append(f"link {word!r}: no heading #{anchor} in {linked.name}")
        module = MODULE.search(word) if kind == "code" else None
        if module and not module_exists(module.group()):
            problems.append(f"module {module.group()!r}: not a module of the repository")
        if kind == "code" and OLD_MODULE.match(word) and Path(word).suffix not in DATA_FILES:
            problems.append(f"module {word!r}: the installed name is charrnn.{word}")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: path.relative_to(REPO).as_posix())
def test_every_path_a_doc_names_exists(doc: Path) -> None:
    problems = broken(doc)
    assert not problems, "\n".join(problems)


def test_the_check_finds_what_is_missing_and_skips_what_is_not_a_path(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(
        "# Here\n"
        "`service/app.py`, [gone](gone.md), `charrnn.service.nothing_here`, `tests/test_docs.py::test_nothing`.\n"
        "Old: `model.stops.StopMatcher`. Found: `service/engine/scheduler.py`, `charrnn.model.stops.StopMatcher`.\n"
        "Not paths: `runs/poems`, `NAME.safetensors`, `/v1/completions`, `~/.cache/charrnn`, `$X/corpora`,\n"
        "[a site](https://example.com/a.md), [here](#here), [there](#not-here), `*.py`, `best.safetensors`,\n"
        "`--out models/x.pt`, `model.safetensors`, `tests/test_docs.py`, `charrnn.service.engine.batch.make_batch`.\n"
        "```bash\npython service/app.py\n```\n"
    )
    assert broken(doc) == [
        "link 'gone.md': no such file or directory",
        "link '#not-here': no heading #not-here in doc.md",
        "code 'service/app.py': no such file or directory",
        "module 'charrnn.service.nothing_here': not a module of the repository",
        "code 'tests/test_docs.py::test_nothing': no test test_nothing in tests/test_docs.py",
        "module 'model.stops.StopMatcher': the installed name is charrnn.model.stops.StopMatcher",
    ]
