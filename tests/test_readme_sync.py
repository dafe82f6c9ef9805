"""Keeps `README.zh-CN.md` in step with `README.md`: structure only.

The Chinese README translates the short English README. These tests do not judge the
translation and do not compare prose or numbers; they check the structure that must
not drift: the same headings (count and levels, in order), byte-identical fenced code
blocks (the commands and examples) in each section, and the same link and image
targets in each section. Each failure names the English section to update.

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

_FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# [text](target) and ![alt](target): the target, without an optional "title".
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)")
# The language links at the top point at each other, so they differ by design.
_LANGUAGE_LINKS = {"README.md", "README.zh-CN.md"}


@dataclass
class Section:
    """A heading and everything up to the next heading."""

    level: int
    title: str
    code_blocks: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)


def parse(path: Path) -> list[Section]:
    """Splits a markdown file into sections (the text before the first heading is section 0)."""
    sections = [Section(0, "(top of file)")]
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        current = sections[-1]
        fence = _FENCE.match(line)
        if fence:
            marker = fence.group(1)
            block = [line]
            i += 1
            while i < len(lines) and not (
                lines[i].strip().startswith(marker) and lines[i].strip().strip(marker[0]) == ""
            ):
                block.append(lines[i])
                i += 1
            if i >= len(lines):
                raise AssertionError(f"{path.name}: unclosed code block in section {current.title!r}")
            block.append(lines[i])
            current.code_blocks.append("\n".join(block))
            i += 1
            continue
        heading = _HEADING.match(line)
        if heading:
            sections.append(Section(len(heading.group(1)), heading.group(2)))
        else:
            current.links.extend(t for t in _LINK.findall(line) if t not in _LANGUAGE_LINKS)
        i += 1
    return sections


@pytest.fixture(scope="module")
def both() -> tuple[list[Section], list[Section]]:
    if not ZH.exists():
        pytest.fail("README.zh-CN.md is missing: it is the Chinese translation of README.md")
    return parse(EN), parse(ZH)


def _outline(sections: list[Section]) -> list[str]:
    return [f"{'#' * s.level} {s.title}" for s in sections[1:]]


def _section_name(en: Section, zh: Section) -> str:
    return f"section {en.title!r} of README.md (Chinese: {zh.title!r})"


def test_chinese_readme_links_back_to_english():
    assert "[English](README.md)" in ZH.read_text(encoding="utf-8"), (
        "README.zh-CN.md should start with a [English](README.md) link"
    )
    assert "README.zh-CN.md" in EN.read_text(encoding="utf-8"), (
        "README.md should link README.zh-CN.md"
    )


def test_same_headings_in_same_order(both):
    en, zh = both
    en_out, zh_out = _outline(en), _outline(zh)
    for k in range(max(len(en_out), len(zh_out))):
        e = en_out[k] if k < len(en_out) else "(no heading)"
        z = zh_out[k] if k < len(zh_out) else "(no heading)"
        assert e.split(" ")[0] == z.split(" ")[0], (
            f"heading #{k + 1} out of sync: README.md has {e!r}, README.zh-CN.md has {z!r}. "
            f"README.md has {len(en_out)} headings, README.zh-CN.md {len(zh_out)}: translate the "
            f"added section or remove the deleted one so that both outlines match."
        )


def test_code_blocks_identical_per_section(both):
    en, zh = both
    test_same_headings_in_same_order(both)
    for e, z in zip(en, zh):
        assert len(e.code_blocks) == len(z.code_blocks), (
            f"{_section_name(e, z)}: {len(e.code_blocks)} code blocks in README.md, "
            f"{len(z.code_blocks)} in README.zh-CN.md; update the Chinese section"
        )
        for k, (a, b) in enumerate(zip(e.code_blocks, z.code_blocks), 1):
            assert a == b, (
                f"{_section_name(e, z)}: code block {k} differs; copy it byte for byte into "
                f"README.zh-CN.md (commands and code comments stay in English).\n"
                f"--- README.md\n{a}\n--- README.zh-CN.md\n{b}"
            )


def test_same_links_and_images_per_section(both):
    en, zh = both
    test_same_headings_in_same_order(both)
    for e, z in zip(en, zh):
        assert sorted(set(e.links)) == sorted(set(z.links)), (
            f"{_section_name(e, z)}: links/images differ; README.md points to "
            f"{sorted(set(e.links))}, README.zh-CN.md to {sorted(set(z.links))}. "
            "Update the Chinese section so that both point to the same pages and images."
        )


def test_parser_sees_the_structure():
    """Guards the parser itself: the English README has sections, code blocks and links."""
    en = parse(EN)
    assert len(_outline(en)) >= 5
    assert sum(len(s.code_blocks) for s in en) >= 4
    assert any("docs/" in link for s in en for link in s.links)
    assert any(link.endswith(".png") for s in en for link in s.links)
