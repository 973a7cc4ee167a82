"""Links into docs/design.md resolve: code, tests and docs point to its sections by anchor
(``docs/design.md#the-warm-path``), so a renamed heading must not leave them pointing nowhere;
and the headings others link to exist."""

from __future__ import annotations

import re
from pathlib import Path

from tests.support.paths import REPO

DESIGN_MD = REPO / "docs" / "design.md"

# The sections code and docs link to (docs/design.md is organised around them).
REQUIRED = [
    "What runs where",
    "Layout",
    "Serialization",
    "The warm path",
    "Callbacks cross the wire",
    "Trust: one pool is one trust domain",
    "Scaling and losing peers",
    "Errors a user can catch",
    "The public surface",
]

SEARCHED = ["pool", "worker", "tests", "docs", "examples", "charts", "scripts", "README.md", "pyproject.toml",
            "Dockerfile"]
SUFFIXES = {".py", ".md", ".toml", ".yaml", ".yml", ".tpl", ".txt", ".sh", ""}


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(path: Path) -> list[str]:
    return [m[1] for m in re.finditer(r"^#{1,6} (.+)$", path.read_text(encoding="utf-8"), re.MULTILINE)]


def text_files() -> list[Path]:
    found = []
    for name in SEARCHED:
        root = REPO / name
        paths = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        found += [p for p in paths if p.suffix in SUFFIXES and "__pycache__" not in p.parts]
    return found


def test_the_sections_others_link_to_exist():
    assert [h for h in REQUIRED if h not in headings(DESIGN_MD)] == []


def test_every_link_to_a_design_section_resolves():
    anchors = {slug(h) for h in headings(DESIGN_MD)}
    broken = []
    for path in text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        links = re.findall(r"design\.md#([\w-]+)", text)
        if path == DESIGN_MD:
            links += re.findall(r"\]\(#([\w-]+)\)", text)
        broken += [f"{path.relative_to(REPO)}: #{anchor}" for anchor in links if anchor not in anchors]
    assert broken == [], "links to sections docs/design.md does not have:\n" + "\n".join(broken)


def test_slug_matches_githubs_anchors():
    assert slug("Trust: one pool is one trust domain") == "trust-one-pool-is-one-trust-domain"
    assert slug("Identity on the wire (protocol RK8S/2)") == "identity-on-the-wire-protocol-rk8s2"
    assert slug("What libzmq does not bound, and how the broker does") == \
        "what-libzmq-does-not-bound-and-how-the-broker-does"
