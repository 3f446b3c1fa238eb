"""The project's docs hold together: every relative link of README.md and docs/*.md points at a
file of the repository (and, with a #fragment, at a heading of that file), and the op tables
name every registered op, docs/design.md with its exact schema."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import miss_ext

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
if not (REPO / "docs").is_dir():
    pytest.skip("the docs are in the source tree only", allow_module_level=True)

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where brackets are not links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def heading_anchors(path: Path) -> set:
    """GitHub's anchors of a markdown file's headings: lower case, punctuation dropped,
    spaces to hyphens (duplicates numbered -1, -2, ...)."""
    anchors, seen = set(), {}
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    for match in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        anchors.add(slug if count == 0 else f"{slug}-{count}")
        seen[slug] = count + 1
    return anchors


def relative_links(path: Path):
    for target in LINK.findall(prose(path.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:, ...
            continue
        yield target


def test_the_docs_the_readme_cites_are_in_the_repository():
    assert (REPO / "docs" / "spec.md").is_file() and (REPO / "docs" / "design.md").is_file()
    readme = (REPO / "README.md").read_text()
    for name in ("docs/spec.md", "docs/design.md", "LICENSE"):
        assert f"({name}" in readme, f"README does not link {name}"
    # the internal planning files of the project's first sessions are not part of the repository
    assert not re.search(r"(?<![\w/])(SPEC|DESIGN)\.md", readme)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(doc):
    broken = []
    for target in relative_links(doc):
        file_part, _, fragment = target.partition("#")
        resolved = (doc.parent / file_part).resolve() if file_part else doc
        if not resolved.exists() or REPO not in (resolved, *resolved.parents):
            broken.append(f"{target} (no such file in the repository)")
        elif fragment and resolved.suffix == ".md" and fragment not in heading_anchors(resolved):
            broken.append(f"{target} (no heading #{fragment} in {resolved.relative_to(REPO)})")
    assert not broken, f"{doc.relative_to(REPO)}: broken links: {broken}"


def test_the_link_checker_sees_links_and_rejects_broken_ones(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("# A title\n[ok](#a-title) ![img](x.png) `[not](a link)`\n```\n[nor](this)\n```\n"
                   "[web](https://example.com)\n")
    assert list(relative_links(doc)) == ["#a-title", "x.png"]
    assert heading_anchors(doc) == {"a-title"}
    readme_anchors = heading_anchors(REPO / "README.md")
    assert {"the-ops", "install", "performance-cpu-measurements-gpu-predictions"} <= readme_anchors


def test_design_lists_every_registered_op_with_its_schema():
    design = (REPO / "docs" / "design.md").read_text()
    for name in miss_ext.ops.op_names():
        schema = str(getattr(torch.ops.miss, name).default._schema)
        assert f"`{schema}`" in design, f"docs/design.md: op {name} missing or its schema is not {schema}"
    listed = set(re.findall(r"^\| `(\w+)` \| `miss::", design, re.M))
    assert listed == set(miss_ext.ops.op_names())


def test_readme_op_table_names_every_op():
    readme = (REPO / "README.md").read_text().split("## The ops", 1)[1]
    for name in miss_ext.ops.op_names():
        assert f"| `{name}(" in readme, f"README 'The ops' table does not list {name}"
