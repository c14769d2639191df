"""Every relative link in the Markdown the repository ships leads somewhere: the file exists,
and a `#section` names a heading of that file (as GitHub makes anchors of headings)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import REPO

PAGES = sorted(
    p
    for pattern in ("*.md", "docs/*.md", "bench/*.md", "k8s/**/*.md", "terraform/**/*.md")
    for p in REPO.glob(pattern)
)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # no headings in code
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, flags=re.M)}


def test_the_anchor_rule_is_githubs() -> None:
    heading = "Checkpoint timings (H200, bf16, `python -m bench.preemption`)"
    assert github_anchor(heading) == "checkpoint-timings-h200-bf16-python--m-benchpreemption"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_lead_somewhere(page: Path) -> None:
    broken = []
    for link in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", link):  # http(s):, mailto:
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{link}: no such section in {target.relative_to(REPO)}")
    assert not broken, broken
