"""Writes docs/api.md, the API reference, from the docstrings of `keras_sie.__all__`.

    python scripts/gen_api_docs.py           # rewrite docs/api.md
    python scripts/gen_api_docs.py --check   # exit 1 (and say so) when docs/api.md is stale

No dependency beyond the package itself: `inspect` reads the public names, their
signatures and docstrings (Google style: `Args:`, `Returns:`, `Raises:`,
`Attributes:`, `Example:`), and this script turns them into Markdown. Public
members of public classes are listed too, except the hooks a class inherits from a
framework base (`on_epoch_end`, `set_model`, ...: Keras documents those).

Code examples in docstrings are shown in `docs/api.md` under a
`<!-- docs-test: skip -->` marker: they assume the reader's model and data, and
`tests/test_docs.py` runs the examples of the hand-written pages instead.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "docs" / "api.md"
SKIP_MARKER = "<!-- docs-test: skip -->"

_SECTION = re.compile(
    r"^(Args|Arguments|Attributes|Returns|Yields|Raises|Example|Examples|Note|Notes|Warning)"
    r":\s*$"
)
_ITEM = re.compile(r"^(\S[^:]*?):\s*(.*)$")
_LISTED = {"Args", "Arguments", "Attributes", "Raises"}


def _import_package():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(ROOT))
    import keras_sie

    return keras_sie


def _signature(obj) -> str:
    """`(a, b=1, *, c=None)`: defaults kept, annotations left to the docstring."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return ""
    params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    if params and params[0].name in ("self", "cls"):
        params = params[1:]
    return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))


def _dedent(lines: list[str]) -> list[str]:
    indents = [len(line) - len(line.lstrip()) for line in lines if line.strip()]
    cut = min(indents) if indents else 0
    return [line[cut:] for line in lines]


def _render_items(lines: list[str]) -> list[str]:
    """`name: text` entries (continuations indented further) as a bullet list."""
    out: list[str] = []
    for line in _dedent(lines):
        if not line.strip():
            continue
        match = _ITEM.match(line)
        if match and not line.startswith(" "):
            name, text = match.groups()
            out.append(f"- `{name.strip()}`: {text}".rstrip())
        elif out:
            out[-1] += " " + line.strip()
        else:
            out.append(line.strip())
    return out


def _render_docstring(doc: str) -> list[str]:
    """A Google-style docstring as Markdown lines."""
    lines = doc.splitlines()
    out: list[str] = []
    i = 0
    in_fence = False
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith("```"):
            if not in_fence:
                if out and out[-1] != "":
                    out.append("")
                out.append(SKIP_MARKER)
            in_fence = not in_fence
            out.append(stripped)
            i += 1
            continue
        if in_fence:
            out.append(line)
            i += 1
            continue
        section = _SECTION.match(line)
        if section:
            name = section.group(1)
            body: list[str] = []
            i += 1
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith(" ")):
                body.append(lines[i])
                i += 1
            while body and not body[-1].strip():
                body.pop()
            if out and out[-1] != "":
                out.append("")
            out.append(f"**{name}:**")
            out.append("")
            if name in _LISTED:
                out.extend(_render_items(body))
            else:
                out.extend(line.strip() for line in _dedent(body) if line.strip())
            if out[-1] != "":
                out.append("")
            continue
        out.append(line.rstrip())
        i += 1
    while out and not out[-1].strip():
        out.pop()
    return out


def _framework_hook(cls, name: str) -> bool:
    """True for a member that overrides one of a non-keras_sie base class (a Keras hook)."""
    for base in cls.__mro__[1:]:
        if base is object or base.__module__.startswith("keras_sie"):
            continue
        if name in vars(base):
            return True
    return False


def public_members(cls) -> list[tuple[str, object]]:
    """Public methods and properties defined on `cls` itself, framework hooks left out."""
    members = []
    for name, value in vars(cls).items():
        if name.startswith("_") or _framework_hook(cls, name):
            continue
        if isinstance(value, (property, staticmethod, classmethod)) or inspect.isfunction(value):
            members.append((name, value))
    return members


def member_doc(cls, name: str, value) -> str | None:
    if isinstance(value, property):
        return inspect.cleandoc(value.__doc__) if value.__doc__ else None
    return inspect.getdoc(getattr(cls, name))


def public_names(package) -> list[str]:
    return [name for name in package.__all__ if not name.startswith("_")]


def render() -> str:
    package = _import_package()
    names = public_names(package)
    out = [
        "# API reference",
        "",
        "<!-- Generated by scripts/gen_api_docs.py from the docstrings: do not edit by hand. -->",
        "",
        "Generated from the docstrings of the public names in `keras_sie.__all__`. "
        "To change this page, edit the docstring and run `python scripts/gen_api_docs.py`. "
        "Usage with context is in [usage.md](usage.md) and [acting.md](acting.md).",
        "",
    ]
    out += [f"- [`{name}`](#{name.lower()})" for name in names]
    out.append("")
    for name in names:
        obj = getattr(package, name)
        kind = "class" if inspect.isclass(obj) else "function"
        out.append(f"## {name}")
        out.append("")
        out.append("```text")
        out.append(f"{kind} keras_sie.{name}{_signature(obj)}")
        out.append("```")
        out.append("")
        out += _render_docstring(inspect.getdoc(obj) or "(no docstring)")
        out.append("")
        if inspect.isclass(obj):
            for member, value in public_members(obj):
                if isinstance(value, property):
                    title = f"### {name}.{member} (property)"
                    sig = ""
                else:
                    title = f"### {name}.{member}"
                    sig = _signature(getattr(obj, member))
                out.append(title)
                out.append("")
                if sig:
                    out += ["```text", f"{name}.{member}{sig}", "```", ""]
                out += _render_docstring(member_doc(obj, member, value) or "(no docstring)")
                out.append("")
    while out and not out[-1]:
        out.pop()
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 when docs/api.md differs from the docstrings")
    args = parser.parse_args(argv)
    text = render()
    current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else None
    if args.check:
        if current != text:
            print("docs/api.md is stale: run `python scripts/gen_api_docs.py` and commit it.",
                  file=sys.stderr)
            return 1
        print("docs/api.md is up to date.")
        return 0
    if current != text:
        OUTPUT.write_text(text, encoding="utf-8")
        print(f"wrote {OUTPUT.relative_to(ROOT)}")
    else:
        print("docs/api.md already up to date.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
