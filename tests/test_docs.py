"""The documentation's links resolve: every relative link and image in README.md and docs/*.md points at a file that
exists, and every ``#anchor`` names a heading of its target under GitHub's slug rules. Also: the README stays short
and links every docs page. Standard library only; runs in well under a second."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_LINES = 300

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
# [text](target "title") and ![alt](target); the text may hold one level of brackets, the target may be <...>
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^\s)]+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
SETEXT_UNDERLINE = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
HTML_ANCHOR = re.compile(r"<a\s+[^>]*(?:name|id)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)
EXTERNAL = re.compile(r"^(?:https?:|mailto:)", re.IGNORECASE)


def rel(path: Path) -> str:
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line outside fenced code blocks."""
    out, fence = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)
        elif fence is not None and m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence):
            fence = None
        elif fence is None:
            out.append((number, line))
    return out


def heading_text(raw: str) -> str:
    """A heading's rendered text: code spans keep their content, links and images their text, emphasis and
    inline HTML vanish."""
    parts = []
    for i, piece in enumerate(CODE_SPAN.split(raw)):
        # re.split with two groups: prose, backticks, code, prose, ...
        if i % 3 == 2:
            parts.append(piece.strip())
        elif i % 3 == 0:
            piece = re.sub(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\([^)]*\)", r"\1", piece)
            piece = re.sub(r"<[^>]+>", "", piece)
            parts.append(re.sub(r"(\*+|(?<!\w)_+|_+(?!\w))", "", piece))
    return "".join(parts).strip()


def github_slug(text: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation other than '-' and '_' dropped (unicode letters and
    digits kept), each space turned into '-'."""
    kept = []
    for ch in text.lower():
        cat = unicodedata.category(ch)
        if ch in "-_" or cat[0] in "LN" or cat == "Mn" or cat == "Mc":
            kept.append(ch)
        elif ch == " ":
            kept.append("-")
    return "".join(kept)


def anchors(path: Path) -> set[str]:
    """Every anchor a Markdown file offers: its headings' slugs (duplicates get -1, -2, ...) and HTML anchors."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    lines = prose_lines(path.read_text(encoding="utf-8"))
    headings = []
    for i, (number, line) in enumerate(lines):
        m = ATX_HEADING.match(line)
        if m:
            headings.append(m.group(2) or "")
        elif SETEXT_UNDERLINE.match(line) and i > 0 and lines[i - 1][0] == number - 1 and lines[i - 1][1].strip():
            previous = lines[i - 1][1]
            if not ATX_HEADING.match(previous) and not previous.lstrip().startswith(("-", "*", "|", ">")):
                headings.append(previous.strip())
        found.update(HTML_ANCHOR.findall(line))
    for raw in headings:
        slug = github_slug(heading_text(raw))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every inline link, image and reference definition outside code."""
    out = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        line = CODE_SPAN.sub("", line)
        for m in INLINE_LINK.finditer(line):
            out.append((number, m.group(1)))
        definition = REFERENCE_DEF.match(line)
        if definition:
            out.append((number, definition.group(1)))
    return [(n, t[1:-1] if t.startswith("<") and t.endswith(">") else t) for n, t in out]


def problems_of(page: Path) -> list[str]:
    problems = []
    for number, target in links(page):
        if EXTERNAL.match(target):
            continue
        where = f"{rel(page)}:{number}: link ({target})"
        path_part, _, anchor = target.partition("#")
        dest = page if not path_part else (page.parent / unquote(path_part)).resolve()
        if not dest.exists():
            problems.append(f"{where}: file {unquote(path_part)!r} does not exist (resolved to {dest})")
            continue
        if not anchor:
            continue
        if dest.is_dir() or dest.suffix.lower() != ".md":
            problems.append(f"{where}: anchor #{anchor} points into {rel(dest)}, which is not a Markdown file")
            continue
        if unquote(anchor) not in anchors(dest):
            problems.append(f"{where}: {rel(dest)} has no heading whose anchor is #{anchor}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=[rel(p) for p in PAGES])
def test_relative_links_and_anchors_resolve(page: Path):
    problems = problems_of(page)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_readme_is_at_most_300_lines():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, (
        f"README.md: {n} lines, more than {README_MAX_LINES}; move the detail into a page under docs/"
    )


def test_readme_links_every_docs_page():
    linked = {
        (README.parent / unquote(t.partition("#")[0])).resolve()
        for _, t in links(README)
        if not EXTERNAL.match(t) and t.partition("#")[0]
    }
    missing = [rel(p) for p in DOCS if p.resolve() not in linked]
    assert not missing, f"README.md: its docs map has no link to {', '.join(missing)}"


def test_the_slug_rule_matches_github():
    assert github_slug(heading_text("Losses (`lt_models/losses/registry.py`)")) == "losses-lt_modelslossesregistrypy"
    assert github_slug(heading_text("Ctrl+C and `--resume`")) == "ctrlc-and---resume"
    assert github_slug(heading_text("ASHA over configurations (with seeds)")) == "asha-over-configurations-with-seeds"
    assert github_slug(heading_text("λ and ξ, measured")) == "λ-and-ξ-measured"
    assert github_slug(heading_text("The papers' findings: 8 of 12")) == "the-papers-findings-8-of-12"
    assert github_slug(heading_text("[Linked](x.md) *emphasis*")) == "linked-emphasis"
    assert github_slug(heading_text("`_private_name` and _emphasis_")) == "_private_name-and-emphasis"


def test_duplicate_headings_get_numbered_anchors(tmp_path: Path):
    page = tmp_path / "page.md"
    page.write_text("# Notes\n\n## Notes\n\n```\n# Notes\n```\n\nSetext\n------\n\n## Notes\n", encoding="utf-8")
    assert anchors(page) == {"notes", "notes-1", "notes-2", "setext"}


def test_links_in_code_are_ignored(tmp_path: Path):
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](page.md#title)\n\n# Title\n\n```\n[no](missing.md)\n```\n\n`[no](missing.md)` and [gone](gone.md#x)\n",
        encoding="utf-8",
    )
    assert [t for _, t in links(page)] == ["page.md#title", "gone.md#x"]
