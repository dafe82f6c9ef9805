"""The documentation cannot rot: docstrings exist, docs/api.md is current, examples run.

* every public name in `keras_sie.__all__`, and every public method / property of a
  public class, has a docstring (hooks a class inherits from Keras, such as
  `on_epoch_end` or `set_model`, are documented by Keras and left out);
* docs/api.md equals what `scripts/gen_api_docs.py` writes from those docstrings;
* every ```python block of README.md and docs/*.md runs, page by page: each page's
  blocks run in order in one namespace (a block may use what an earlier block of the
  same page defined), in a fresh temporary directory. A block preceded by the line
  `<!-- docs-test: skip -->` is shown but not run (docs/api.md marks its docstring
  examples so); blocks that are not meant to run are better fenced as ```text.
  See docs/development.md.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_MARKER = "<!-- docs-test: skip -->"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w+-]*)")


def _gen_api_docs():
    spec = importlib.util.spec_from_file_location(
        "gen_api_docs", ROOT / "scripts" / "gen_api_docs.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def python_blocks(path: Path) -> list[tuple[int, str, bool]]:
    """`(first line number, code, skipped)` of every ```python block of a Markdown file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i].strip())
        if not match:
            i += 1
            continue
        fence, lang = match.group(1), match.group(2).lower()
        start = i
        i += 1
        body = []
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        if i >= len(lines):
            raise AssertionError(f"{path.name}: unclosed code block at line {start + 1}")
        i += 1
        if lang in ("python", "py", "python3"):
            previous = next((lines[k].strip() for k in range(start - 1, -1, -1)
                             if lines[k].strip()), "")
            indent = len(lines[start]) - len(lines[start].lstrip())
            code = "\n".join(line[indent:] for line in body)
            blocks.append((start + 2, code, previous == SKIP_MARKER))
    return blocks


# --------------------------------------------------------------------------- docstrings


def test_every_public_name_has_a_docstring():
    import keras_sie

    gen = _gen_api_docs()
    missing = []
    for name in gen.public_names(keras_sie):
        obj = getattr(keras_sie, name)
        if not (inspect.getdoc(obj) or "").strip():
            missing.append(f"keras_sie.{name}")
        if inspect.isclass(obj):
            for member, value in gen.public_members(obj):
                if not (gen.member_doc(obj, member, value) or "").strip():
                    missing.append(f"keras_sie.{name}.{member}")
    assert not missing, (
        "public names without a docstring (add a Keras-style docstring with Args/Returns, "
        "then run `python scripts/gen_api_docs.py`):\n  " + "\n  ".join(missing)
    )


def test_api_page_is_up_to_date():
    gen = _gen_api_docs()
    expected = gen.render()
    current = gen.OUTPUT.read_text(encoding="utf-8") if gen.OUTPUT.exists() else ""
    if current != expected:
        import difflib

        diff = "".join(list(difflib.unified_diff(
            current.splitlines(True), expected.splitlines(True),
            "docs/api.md (committed)", "docs/api.md (from the docstrings)",
        ))[:60])
        pytest.fail(
            "docs/api.md is stale: run `python scripts/gen_api_docs.py` and commit "
            "docs/api.md.\n" + diff
        )


# --------------------------------------------------------------------------- examples


def test_block_extraction_sees_the_examples():
    """Guards the parser: the README's quick start is found, api.md's examples are skipped."""
    readme = python_blocks(ROOT / "README.md")
    assert readme and not any(skipped for _, _, skipped in readme)
    assert any("SampleImportance" in code for _, code, _ in readme)
    api = ROOT / "docs" / "api.md"
    if api.exists():
        assert all(skipped for _, _, skipped in python_blocks(api))


@pytest.mark.parametrize(
    "page",
    [p for p in PAGES if any(not skipped for _, _, skipped in python_blocks(p))],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    import keras

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    namespace: dict = {"__name__": "__docs__"}
    rel = page.relative_to(ROOT)
    for number, (line, code, skipped) in enumerate(python_blocks(page), 1):
        if skipped:
            continue
        try:
            exec(compile(code, f"{rel}:{line}", "exec"), namespace)  # noqa: S102 - docs code
        except Exception:  # noqa: BLE001 - reported with the block's place in the page
            pytest.fail(
                f"{rel}: python block {number} (line {line}) failed; fix the example or "
                f"the code it shows (blocks of one page share a namespace):\n"
                f"{traceback.format_exc(limit=-6)}"
            )
        finally:
            os.chdir(tmp_path)


# --------------------------------------------------------------------------- commands


def test_readme_test_command_is_what_ci_runs():
    """The README's test command and `.ci/run` must stay the same command."""
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith(("#", "set ", "cd ", "export "))]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    bash_blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.DOTALL)
    commands = {line.strip() for block in bash_blocks for line in block.splitlines()}
    missing = [line for line in ci_lines if line not in commands]
    assert ci_lines and not missing, (
        f".ci/run runs {ci_lines} but the README's set-up blocks do not show {missing}: "
        "update the test command in README.md (section 'Set-up'), README.zh-CN.md and "
        "docs/development.md together with .ci/run"
    )
