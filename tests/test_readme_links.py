"""The README's in-page links land on a heading (GitHub's anchor rule), so a renamed section
cannot leave a partner, coordinator or researcher at a dead link."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def github_anchor(heading: str) -> str:
    """GitHub's slug: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_github_anchor_rule_on_known_headings():
    assert github_anchor("Central DP (`dp-mode = \"central\"` or `\"both\"`)") == "central-dp-dp-mode--central-or-both"
    assert github_anchor("Secure aggregation (SecAgg+)") == "secure-aggregation-secagg"


def test_every_in_page_link_lands_on_a_heading():
    text = README.read_text(encoding="utf-8")
    outside_code = re.sub(r"```.*?```", "", text, flags=re.S)
    anchors = {github_anchor(h) for h in re.findall(r"^#+ (.+)$", outside_code, flags=re.M)}
    links = re.findall(r"\]\(#([^)]+)\)", outside_code)
    assert links, "the README has in-page links (the contents by role)"
    dead = sorted(set(links) - anchors)
    assert not dead, f"README links to missing headings: {dead}"
