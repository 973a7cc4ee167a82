"""The documentation checks itself against the repository: links, command lines, size, and that it
stands alone.

* Every relative link in the README, ``docs/**/*.md`` and the chart's README points to a file that
  exists, and a ``#anchor`` to a heading of that file (GitHub's slugs), so a newcomer following a
  link never lands on nothing.
* Every ``runnable-k8s VERB --flag`` and ``python -m worker --flag`` the docs name exists in the
  real argparse parsers (``pool.cli.build_parser``, ``worker.__main__.build_parser``), and every
  bare ``--flag`` in inline code is one of ours or of a tool the docs name (helm, kubectl, docker,
  pip, pytest): renamed flags fail here, not in a user's terminal.
* Every repository path the docs name in inline code (``tests/...py``, ``pool/...``) exists.
* The README stays a front door: under 350 lines.
* No file tracked by git points at things a reader of the repository cannot open (the team's
  shared notes, numbered design sections of a document outside it, issue numbers).
"""

from __future__ import annotations

import argparse
import re
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

README_MAX_LINES = 350


def doc_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "charts" / "worker-pool" / "README.md"]
    files += sorted((ROOT / "docs").rglob("*.md"))
    return [f for f in files if f.is_file()]


def doc_ids() -> list[str]:
    return [str(f.relative_to(ROOT)) for f in doc_files()]


# ------------------------------------------------------------------ reading markdown

FENCE = re.compile(r"^\s*(```|~~~)")


def split_fenced(text: str) -> tuple[list[str], list[str]]:
    """(prose lines, code lines): lines inside fenced blocks go to the second list, the fences to
    neither."""
    prose: list[str] = []
    code: list[str] = []
    inside = False
    for line in text.splitlines():
        if FENCE.match(line):
            inside = not inside
            continue
        (code if inside else prose).append(line)
    return prose, code


def prose_paragraphs(text: str) -> list[str]:
    """Prose joined into one line per paragraph or table row, so an inline code span wrapped over
    two lines reads as one."""
    prose, _ = split_fenced(text)
    paragraphs: list[str] = []
    current: list[str] = []
    for line in prose:
        if not line.strip() or line.lstrip().startswith("|"):
            if current:
                paragraphs.append(" ".join(current))
                current = []
            if line.strip():
                paragraphs.append(line)
            continue
        current.append(line.strip())
    if current:
        paragraphs.append(" ".join(current))
    return paragraphs


def code_commands(text: str) -> list[str]:
    """Lines of fenced code, with backslash continuations joined."""
    _, code = split_fenced(text)
    lines: list[str] = []
    pending = ""
    for line in code:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    if pending:
        lines.append(pending)
    return lines


INLINE_CODE = re.compile(r"`([^`]+)`")


def inline_code_spans(text: str) -> list[str]:
    return [m.group(1).replace("\\|", "|") for p in prose_paragraphs(text) for m in INLINE_CODE.finditer(p)]


# ------------------------------------------------------------------ links and anchors

LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def links(text: str) -> list[str]:
    """Link targets of the prose (inline code and fenced code are not links)."""
    found = []
    for paragraph in prose_paragraphs(text):
        without_code = INLINE_CODE.sub("", paragraph)
        found += [m.group(1) for m in LINK.finditer(without_code)]
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, markup dropped, lowercase, punctuation other
    than ``-`` and ``_`` removed, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    text = text.lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    prose, _ = split_fenced(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    found = set()
    for line in prose:
        # An explicit anchor (<a id="threads"></a> before a long heading) is a link target too.
        found.update(re.findall(r'<a id="([\w-]+)"></a>', line))
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return frozenset(found)


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def broken_links(doc: Path) -> list[str]:
    problems = []
    for target in links(doc.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ... not ours to check
            continue
        path_part, _, anchor = target.partition("#")
        resolved = (doc.parent / path_part).resolve() if path_part else doc
        if not resolved.exists():
            problems.append(f"{target}: no file {shown(resolved)}")
            continue
        if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{target}: no heading with anchor #{anchor} in {shown(resolved)}")
    return problems


@pytest.mark.parametrize("doc", doc_files(), ids=doc_ids())
def test_every_relative_link_points_to_a_file_and_heading_that_exist(doc: Path) -> None:
    assert broken_links(doc) == []


def test_the_link_check_sees_a_broken_link_and_a_missing_anchor(tmp_path: Path) -> None:
    """The checker itself: a link to a missing file and one to a missing heading are reported, a
    good one is not."""
    (tmp_path / "other.md").write_text("# Title\n\n## What comes back, and `trust_workers`\n\n"
                                       '<a id="short"></a>\n## A long heading\n')
    doc = tmp_path / "doc.md"
    doc.write_text("[a](other.md#what-comes-back-and-trust_workers) [b](missing.md) [c](other.md#nope)\n"
                   "[d](other.md#short)\n"
                   "`[not a link](nowhere.md)`\n\n```\n[code](nowhere.md)\n```\n")
    problems = broken_links(doc)
    assert len(problems) == 2, problems
    assert "missing.md" in problems[0] and "#nope" in problems[1]


# ------------------------------------------------------------------ command lines

@cache
def parsers() -> dict[str, argparse.ArgumentParser]:
    """``runnable-k8s VERB`` -> its subparser, and ``python -m worker`` -> the worker's parser."""
    from pool.cli import build_parser
    from worker.__main__ import build_parser as build_worker_parser

    found: dict[str, argparse.ArgumentParser] = {}
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            for verb, sub in action.choices.items():
                found[f"runnable-k8s {verb}"] = sub
    found["python -m worker"] = build_worker_parser()
    return found


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


# A command runs to the end of its line, or to the first of these: a closing backtick, a shell
# separator, a comment, a table cell's end.
COMMAND = re.compile(r"(?<![\w/.=-])(runnable-k8s|python -m pool|python -m worker)(?=\s|$)([^`;#\n]*)")
END = re.compile(r"\s(?:&&|\|\||\||&|>)(?:\s|$)|\s\)")
FLAG = re.compile(r"(?<![\w/=.-])(--?[a-zA-Z][\w-]*)")


def commands(text: str) -> Iterator[tuple[str, str]]:
    """(program, the rest of its command line) for every command the document names."""
    for line in code_commands(text) + inline_code_spans(text):
        for match in COMMAND.finditer(line):
            program, rest = match.group(1), match.group(2)
            end = END.search(rest)
            yield program, rest[: end.start()] if end else rest


def unknown_flags(text: str) -> list[str]:
    problems = []
    known = parsers()
    for program, rest in commands(text):
        if program == "python -m worker":
            key, words = "python -m worker", rest
        else:
            verb = rest.split()[0] if rest.split() else ""
            if verb.endswith(":"):  # a message the program prints ("runnable-k8s broker: refusing ..."), not a command
                continue
            if not verb or verb.startswith("-"):
                if verb in ("--help", "-h", "--version", ""):
                    continue
                problems.append(f"{program}{rest}: no subcommand")
                continue
            key, words = f"runnable-k8s {verb}", rest.split(None, 1)[1] if len(rest.split(None, 1)) > 1 else ""
            if key not in known:
                problems.append(f"{program}{rest}: no subcommand {verb!r}")
                continue
        allowed = options(known[key])
        for flag in FLAG.findall(" " + words):
            if flag not in allowed:
                problems.append(f"{key} has no {flag} (in: {program}{rest.rstrip()})")
    return problems


@pytest.mark.parametrize("doc", doc_files(), ids=doc_ids())
def test_every_command_line_flag_the_docs_name_exists(doc: Path) -> None:
    assert unknown_flags(doc.read_text(encoding="utf-8")) == []


# Flags of other programs the docs show (helm, kubectl, docker, pip, pytest, python).
OTHER_TOOLS_FLAGS = {
    "--set", "--reuse-values", "--wait", "--logs", "--from-literal", "--from-file", "--replicas",
    "--build-arg", "--kube-version", "--show-only", "--dry-run", "--strict", "--upgrade", "-m", "-n",
    "-c", "-e", "-f", "-o", "-t",
}


def unknown_bare_flags(text: str) -> list[str]:
    """Inline code that is a flag alone (``--queue-timeout``, ``--slots N``) must be a flag of one
    of our programs or of a tool the docs show."""
    ours = set().union(*(options(p) for p in parsers().values()))
    problems = []
    for span in inline_code_spans(text):
        match = re.fullmatch(r"(--[a-zA-Z][\w-]*)(?:[ =]\S+)?", span.strip())
        if match and match.group(1) not in ours | OTHER_TOOLS_FLAGS:
            problems.append(span)
    return problems


@pytest.mark.parametrize("doc", doc_files(), ids=doc_ids())
def test_every_flag_named_alone_exists(doc: Path) -> None:
    assert unknown_bare_flags(doc.read_text(encoding="utf-8")) == []


def test_the_flag_check_sees_a_flag_no_parser_has() -> None:
    """The checker itself, against the real parsers: a made-up flag of a real subcommand, a made-up
    subcommand and a made-up worker flag are reported; real ones are not."""
    text = ("`runnable-k8s local --workers 2 --no-such-flag`\n\n"
            "```bash\nrunnable-k8s broker --bind tcp://127.0.0.1:5555 \\\n  --keys ./keys/broker --bogus &\n"
            "runnable-k8s frobnicate --x\npython -m worker --connect tcp://b:5555 --nope | tee log\n```\n"
            "`--invented-flag` and `--queue-timeout`\n")
    problems = unknown_flags(text)
    assert any("--no-such-flag" in p for p in problems), problems
    assert any("--bogus" in p for p in problems), problems
    assert any("frobnicate" in p for p in problems), problems
    assert any("python -m worker has no --nope" in p for p in problems), problems
    named = [p.split(" (in: ")[0] for p in problems]
    assert not any(flag in p for p in named for flag in ("--workers", "--keys", "--connect", "--bind", "tee")), named
    assert unknown_bare_flags(text) == ["--invented-flag"]


# ------------------------------------------------------------------ paths named in inline code

REPO_PATH = re.compile(r"^(?:tests|pool|worker|examples|scripts|docs|charts|\.ci)/[\w./-]*[\w/]$")


def missing_paths(text: str) -> list[str]:
    missing = []
    for span in inline_code_spans(text):
        for word in span.split():
            word = word.strip("(),:;'\"")
            if REPO_PATH.match(word) and not any(c in word for c in "*{}") and not (ROOT / word).exists():
                missing.append(word)
    return missing


@pytest.mark.parametrize("doc", doc_files(), ids=doc_ids())
def test_every_repository_path_the_docs_name_exists(doc: Path) -> None:
    assert missing_paths(doc.read_text(encoding="utf-8")) == []


# ------------------------------------------------------------------ size

def test_the_readme_is_a_front_door_under_350_lines() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/"


# ------------------------------------------------------------------ the repository stands alone

# Written so that this file does not match itself.
OUTSIDE_REFERENCES = re.compile(
    "|".join([
        re.escape("DESIGN " + "\u00a7"),
        re.escape(".." + "/shared"),
        re.escape("/work" + "/shared"),
        r"\bissues?\s+#?\d+",
    ]),
    re.IGNORECASE,
)


def tracked_text_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60)
    files = []
    for name in listed.stdout.decode().split("\0"):
        path = ROOT / name
        if name and path.is_file() and not path.is_symlink():
            files.append(path)
    return files


def outside_references(path: Path) -> list[str]:
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return []  # binary (a plot)
    text = data.decode("utf-8", errors="replace")
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for match in OUTSIDE_REFERENCES.finditer(line):
            found.append(f"{path.relative_to(ROOT)}:{number}: {match.group(0)!r}")
    return found


def test_no_tracked_file_refers_to_what_a_reader_cannot_open() -> None:
    """Not the team's notes, not numbered sections of a design document outside the repository,
    not issue numbers: say what the behaviour is, or link to docs/design.md's headings."""
    found = [hit for path in tracked_text_files() for hit in outside_references(path)]
    assert found == [], "\n".join(found)


def test_the_reference_check_sees_each_kind(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("# see " + "DESIGN " + "\u00a7" + "4\n# from .." + "/shared/notes\n"
                      "# fixed in " + "Issue" + " 12, see " + "issues" + " 2 and 6\n"
                      "# plain text, issues/791 in a URL\n")
    hits = [h.split(": ", 1)[1] for h in outside_references_of(sample, tmp_path)]
    assert len(hits) == 4, hits


def outside_references_of(path: Path, root: Path) -> list[str]:
    """``outside_references`` for a file outside the repository (the self-test's sample)."""
    text = path.read_text()
    return [f"{path.relative_to(root)}:{n}: {m.group(0)!r}" for n, line in enumerate(text.splitlines(), 1)
            for m in OUTSIDE_REFERENCES.finditer(line)]
