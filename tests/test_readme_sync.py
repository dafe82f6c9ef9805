"""Keeps `README.zh-CN.md` in step with `README.md`.

The Chinese README is a maintained translation. These tests do not judge the
translation; they check the structure that must not drift: the same headings
(levels, in order), byte-identical fenced code blocks in the same order, tables
with the same number of rows, the same images and HTML markers, every inline
`code` span (API names, tags, commands) and every decimal number or percentage
of the English prose carried over. Each failure names the English section to
update.

Pure text parsing: this file imports no TensorFlow and runs in well under a second.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EN = ROOT / "README.md"
ZH = ROOT / "README.zh-CN.md"

_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)[^)]*\)")
_COMMENT = re.compile(r"<!--.*?-->")
# Decimal numbers (1.28, 17,179,869,184.5) and percentages (9.4%, 1 %, 10 %). ASCII-only
# look-behind: in Chinese a figure often follows a character directly ("前1%").
_NUMBER = re.compile(r"(?<![A-Za-z0-9_.])(\d[\d,]*\.\d+\s*%?|\d[\d,]*\s*%)")


@dataclass
class Section:
    """A heading and everything up to the next heading."""

    level: int
    title: str
    code_blocks: list[str] = field(default_factory=list)
    tables: list[int] = field(default_factory=list)  # row counts, header included
    images: list[str] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    prose: list[str] = field(default_factory=list)


def parse(path: Path) -> list[Section]:
    """Splits a markdown file into sections (the text before the first heading is section 0)."""
    sections = [Section(0, "(top of file)")]
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    in_table = False
    while i < len(lines):
        line = lines[i]
        current = sections[-1]
        fence = _FENCE.match(line)
        if fence:
            marker = fence.group(2)
            block = [line]
            i += 1
            while i < len(lines):
                block.append(lines[i])
                if lines[i].strip().startswith(marker[0] * len(marker)) and (
                    lines[i].strip().strip(marker[0]) == ""
                ):
                    break
                i += 1
            else:
                raise AssertionError(
                    f"{path.name}: unclosed code block in section {current.title!r}"
                )
            current.code_blocks.append("\n".join(block))
            in_table = False
            i += 1
            continue
        heading = _HEADING.match(line)
        if heading:
            sections.append(Section(len(heading.group(1)), heading.group(2)))
            in_table = False
            i += 1
            continue
        if line.lstrip().startswith("|"):
            if in_table:
                current.tables[-1] += 1
            else:
                current.tables.append(1)
                in_table = True
        else:
            in_table = False
        current.images.extend(_IMAGE.findall(line))
        current.comments.extend(_COMMENT.findall(line))
        current.prose.append(line)
        i += 1
    return sections


def _inline_code(text: str) -> set[str]:
    """Inline `code` spans (API names, tags, commands), whitespace-normalized across line wraps."""
    return {" ".join(m.split()) for m in re.findall(r"`[^`]+`", text)}


def _numbers(text: str) -> set[str]:
    return {re.sub(r"\s+", "", m) for m in _NUMBER.findall(text)}


@pytest.fixture(scope="module")
def both() -> tuple[list[Section], list[Section]]:
    if not ZH.exists():
        pytest.fail(
            "README.zh-CN.md is missing: it is the maintained Chinese translation of README.md"
        )
    return parse(EN), parse(ZH)


def _outline(sections: list[Section]) -> list[str]:
    return [f"{'#' * s.level} {s.title}" for s in sections[1:]]


def _require_same_outline(en: list[Section], zh: list[Section]) -> None:
    if [s.level for s in en] == [s.level for s in zh]:
        return
    en_out, zh_out = _outline(en), _outline(zh)
    for k in range(max(len(en_out), len(zh_out))):
        e = en_out[k] if k < len(en_out) else "(no heading)"
        z = zh_out[k] if k < len(zh_out) else "(no heading)"
        if k >= len(en_out) or k >= len(zh_out) or e.split(" ")[0] != z.split(" ")[0]:
            raise AssertionError(
                f"heading #{k + 1} out of sync: README.md has {e!r}, README.zh-CN.md has {z!r}. "
                f"README.md has {len(en_out)} headings, README.zh-CN.md {len(zh_out)}: translate "
                "the added section or remove the deleted one so both outlines match."
            )
    raise AssertionError("heading levels differ")  # pragma: no cover


def test_chinese_readme_links_back_to_english():
    assert "[English](README.md)" in ZH.read_text(encoding="utf-8")
    assert "README.zh-CN.md" in EN.read_text(encoding="utf-8"), (
        "README.md should link README.zh-CN.md"
    )


def test_same_headings_in_same_order(both):
    en, zh = both
    _require_same_outline(en, zh)
    for e, z in zip(en[1:], zh[1:]):
        missing = [c for c in re.findall(r"`[^`]+`", e.title) if c not in z.title]
        assert not missing, (
            f"section {e.title!r}: the Chinese heading {z.title!r} lacks the code {missing}"
        )


def test_code_blocks_identical_per_section(both):
    en, zh = both
    _require_same_outline(en, zh)
    for e, z in zip(en, zh):
        assert len(e.code_blocks) == len(z.code_blocks), (
            f"section {e.title!r} (Chinese: {z.title!r}) has {len(e.code_blocks)} code blocks in "
            f"README.md but {len(z.code_blocks)} in README.zh-CN.md"
        )
        for k, (a, b) in enumerate(zip(e.code_blocks, z.code_blocks)):
            assert a == b, (
                f"section {e.title!r}: code block {k + 1} differs between README.md and "
                f"README.zh-CN.md; copy it byte for byte (comments in code stay in English).\n"
                f"--- README.md\n{a}\n--- README.zh-CN.md\n{b}"
            )


def test_tables_have_same_rows_per_section(both):
    en, zh = both
    _require_same_outline(en, zh)
    for e, z in zip(en, zh):
        assert e.tables == z.tables, (
            f"section {e.title!r}: table row counts {e.tables} in README.md vs {z.tables} in "
            "README.zh-CN.md (one entry per table, header and separator rows included)"
        )


def test_images_and_markers_carried_over(both):
    en, zh = both
    _require_same_outline(en, zh)
    for e, z in zip(en, zh):
        assert e.images == z.images, (
            f"section {e.title!r}: images {e.images} in README.md vs {z.images} in README.zh-CN.md"
        )
        assert e.comments == z.comments, (
            f"section {e.title!r}: HTML comments/markers {e.comments} in README.md vs "
            f"{z.comments} in README.zh-CN.md (keep markers such as <!-- quality --> in place)"
        )


def test_figures_in_prose_carried_over(both):
    en, zh = both
    _require_same_outline(en, zh)
    problems = []
    for e, z in zip(en, zh):
        missing = sorted(_numbers("\n".join(e.prose)) - _numbers("\n".join(z.prose)))
        if missing:
            problems.append(f"section {e.title!r} (Chinese: {z.title!r}): {', '.join(missing)}")
    assert not problems, (
        "figures in the English prose that the Chinese section does not contain "
        "(update the translation):\n  " + "\n  ".join(problems)
    )


def test_inline_code_carried_over(both):
    """API names, tags, arguments and commands in `code` stay untranslated in every section."""
    en, zh = both
    _require_same_outline(en, zh)
    problems = []
    for e, z in zip(en, zh):
        missing = sorted(_inline_code("\n".join(e.prose)) - _inline_code("\n".join(z.prose)))
        if missing:
            problems.append(f"section {e.title!r} (Chinese: {z.title!r}): {', '.join(missing)}")
    assert not problems, (
        "inline code of the English prose missing from the Chinese section (keep API names, "
        "tags and commands exactly as in English):\n  " + "\n  ".join(problems)
    )


def test_parser_sees_the_structure():
    """Guards the parser itself: the English README has headings, code, tables and figures."""
    en = parse(EN)
    assert sum(len(s.code_blocks) for s in en) >= 10
    assert sum(len(s.tables) for s in en) >= 5
    assert any("## " in h for h in _outline(en))
    assert _numbers("gini 0.772, top 1 % hold 9.4% and 10,000.5") == {
        "0.772",
        "1%",
        "9.4%",
        "10,000.5",
    }
