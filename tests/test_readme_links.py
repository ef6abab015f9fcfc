"""The README's and the guides' (docs/*.md) links land (GitHub's anchor rule), so a renamed section
or a moved file cannot leave a partner, coordinator or researcher at a dead link: an in-page
`](#anchor)` on a heading of the same file, a `](file.md#anchor)` on an existing file and one of
its headings, and any other relative link on an existing path of the repository."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MARKDOWN = [README, *DOCS]


def github_anchor(heading: str) -> str:
    """GitHub's slug: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def outside_code(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)


def anchors(path: Path) -> set[str]:
    """A file's heading anchors; GitHub numbers a repeated slug (`-1`, `-2`, ...)."""
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#+ (.+)$", outside_code(path.read_text(encoding="utf-8")), flags=re.M):
        slug = github_anchor(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def links(path: Path) -> list[str]:
    """Link targets outside code blocks, without external ones (a scheme such as https: or mailto:)."""
    found = re.findall(r"\]\(([^)\s]+)\)", outside_code(path.read_text(encoding="utf-8")))
    return [t for t in found if not re.match(r"[a-zA-Z][a-zA-Z+.-]*:", t)]


def test_github_anchor_rule_on_known_headings():
    assert github_anchor("Central DP (`dp-mode = \"central\"` or `\"both\"`)") == "central-dp-dp-mode--central-or-both"
    assert github_anchor("Secure aggregation (SecAgg+)") == "secure-aggregation-secagg"


def test_the_readme_is_the_entry_point_to_the_guides():
    targets = links(README)
    assert any(t.startswith("#") for t in targets), "the README has in-page links (the results)"
    linked = {t.split("#")[0] for t in targets}
    assert DOCS, "the guides live in docs/"
    unlinked = [d.name for d in DOCS if f"docs/{d.name}" not in linked]
    assert not unlinked, f"guides the README never links to: {unlinked}"
    for doc in DOCS:
        first, _, second = doc.read_text(encoding="utf-8").split("\n")[:3]
        assert first.startswith("# "), f"{doc.name} starts with a one-line title"
        assert "](../README.md)" in second, f"{doc.name} links back to the README on its third line"


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_lands(path: Path):
    dead = []
    for target in links(path):
        file_part, _, anchor = target.partition("#")
        dest = path if not file_part else (path.parent / file_part).resolve()
        if file_part and not dest.exists():
            dead.append(f"{target} (no such path)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            dead.append(f"{target} (no such heading in {dest.relative_to(ROOT)})")
        elif file_part and ROOT not in dest.parents and dest != ROOT:
            dead.append(f"{target} (outside the repository)")
    assert not dead, f"{path.relative_to(ROOT)} has dead links: {dead}"
