"""Griffe extension: turn the Sphinx/reST markup of the package's docstrings into Markdown.

The docstrings are numpydoc (parsed by griffe's numpy parser) and use a little reST that
Markdown does not know:

* cross-reference roles, ``:class:`~pyro_dlatent.latent.AuxScaler```, ``:meth:`fit```,
  ``:func:`infer```, ``:attr:``, ``:data:``, ``:mod:``, ``:exc:``, ``:obj:``: each becomes inline
  code wrapped in an *optional* autorefs link to the name resolved in the docstring's scope, so
  it links where the target is on the site and stays plain code (no warning) where it is not,
  e.g. a private helper or another library's object. ``~`` shows the last component only and
  ``title <target>`` shows the title, as in Sphinx; functions and methods get ``()``;
* ``:math:`...``` becomes inline math ``\\(...\\)`` and a ``.. math::`` directive (one line, or
  an indented block) becomes a ``$$ ... $$`` block, both rendered by ``pymdownx.arithmatex``;
* a literal block introduced by ``::`` becomes a fenced code block (``text::`` reads ``text:``);
* a list that directly follows a paragraph line gets the blank line Markdown needs before it.

``double backticks`` need nothing in prose: they are Markdown code spans already. In the type
of a numpydoc item (``x : Tensor, shape ``(n, d)````), which is shown as code verbatim, they are
dropped.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(class|func|meth|attr|data|mod|exc|obj|const):`([^`]+)`")
MATH_ROLE = re.compile(r":math:`([^`]+)`")
MATH_DIRECTIVE = re.compile(r"^(\s*)\.\. math::\s*(.*)$")
LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+\S")
DIRECTIVE = re.compile(r"^\s*\.\. ")
SECTION_RULE = re.compile(r"^\s*-{3,}\s*$")
ITEM_SECTIONS = {
    "parameters",
    "other parameters",
    "returns",
    "yields",
    "receives",
    "raises",
    "warns",
    "attributes",
}
CALLABLE_ROLES = {"func", "meth"}


def _resolve(obj: griffe.Object, target: str) -> str | None:
    """The full path of ``target`` seen from ``obj``'s scope, or None."""
    package = obj.package.name
    if target == package or target.startswith(package + "."):
        return target
    head, _, rest = target.partition(".")
    scope: griffe.Object | None = obj
    while scope is not None:
        try:
            path = scope.resolve(head)
        except griffe.NameResolutionError:
            path = None
        except Exception:  # an unresolvable import or base class: leave it unlinked
            return None
        if path is None and scope.is_class:
            try:  # a member inherited from a base class
                member = scope.all_members.get(head)
            except Exception:
                member = None
            if member is not None:
                path = f"{scope.path}.{head}"
        if path is not None:
            return f"{path}.{rest}" if rest else path
        scope = scope.parent
    return None


def _title(kind: str, text: str) -> tuple[str, str]:
    """The text a role shows and the name it points at, as Sphinx reads them."""
    text = text.strip()
    titled = re.fullmatch(r"(.+?)\s*<([^<>]+)>", text)
    if titled:
        return titled.group(1), titled.group(2)
    target = text.lstrip("~!")
    title = target.rsplit(".", 1)[-1] if text.startswith("~") else target
    if kind in CALLABLE_ROLES and not title.endswith(")"):
        title += "()"
    return title, target


def _role(obj: griffe.Object, match: re.Match[str]) -> str:
    kind, text = match.group(1), match.group(2).strip()
    title, target = _title(kind, text)
    code = f"<code>{html.escape(title)}</code>"
    path = None if text.startswith("!") else _resolve(obj, target.removesuffix("()"))
    if path is None:
        return code
    return f'<autoref identifier="{html.escape(path)}" optional>{code}</autoref>'


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _block(lines: list[str], i: int, indent: int, *, started: bool) -> tuple[list[str], int]:
    """The lines from ``i`` on that belong to a block opened at indentation ``indent``.

    They are the lines indented deeper, and blank lines between them; with ``started`` (the
    opening line itself held content) a blank line followed by a shallower line ends it.
    """
    body: list[str] = []
    while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > indent):
        if not lines[i].strip() and (started or body) and _next_shallow(lines, i, indent):
            break
        body.append(lines[i])
        i += 1
    return body, i


def _math_block(indent: str, lines: list[str]) -> list[str]:
    body = [line.strip() for line in lines if line.strip()]
    return ["", f"{indent}$$", *(f"{indent}{line}" for line in body), f"{indent}$$", ""]


def _code_block(indent: str, lines: list[str]) -> list[str]:
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    while lines and not lines[0].strip():
        lines = lines[1:]
    base = min(_indent(line) for line in lines if line.strip())
    body = [f"{indent}{line[base:]}" if line.strip() else "" for line in lines]
    return ["", f"{indent}```", *body, f"{indent}```", ""]


def convert(obj: griffe.Object, text: str) -> str:
    """The Markdown form of the reST-flavoured docstring ``text`` of ``obj``."""
    lines = text.splitlines()
    out: list[str] = []
    item_section: int | None = None  # indentation of the items of a Parameters-like section
    i = 0
    while i < len(lines):
        line = lines[i]
        if i + 1 < len(lines) and line.strip() and SECTION_RULE.match(lines[i + 1]):
            item_section = _indent(line) if line.strip().lower() in ITEM_SECTIONS else None
            out.extend([line, lines[i + 1]])
            i += 2
            continue
        directive = MATH_DIRECTIVE.match(line)
        if directive:
            indent, first = directive.group(1), directive.group(2)
            body, i = _block(lines, i + 1, len(indent), started=bool(first))
            out.extend(_math_block(indent, [first, *body]))
            continue
        if line.rstrip().endswith("::") and not DIRECTIVE.match(line):
            body, end = _block(lines, i + 1, _indent(line), started=False)
            if any(b.strip() for b in body):
                indent = line[: _indent(line)]
                intro = line.rstrip()[:-2].rstrip()
                if intro:
                    out.append(intro if intro.endswith(":") else intro + ":")
                out.extend(_code_block(indent, body))
                i = end
                continue
        if item_section is not None and line.strip() and _indent(line) == item_section:
            # "name : type" (or a Returns type alone): shown verbatim as code, so plain text
            line = ROLE.sub(lambda m: _title(m.group(1), m.group(2))[0], line.replace("``", ""))
        if LIST_ITEM.match(line) and out and out[-1].strip() and not LIST_ITEM.match(out[-1]):
            if _indent(line) <= _indent(out[-1]):
                out.append("")
        out.append(line)
        i += 1
    text = "\n".join(out)
    text = MATH_ROLE.sub(lambda m: f"\\({m.group(1)}\\)", text)
    return ROLE.sub(lambda m: _role(obj, m), text)


def _next_shallow(lines: list[str], i: int, indent: int) -> bool:
    """Whether the next non-blank line after ``i`` is not indented deeper than ``indent``."""
    for line in lines[i + 1 :]:
        if line.strip():
            return _indent(line) <= indent
    return True


class SphinxMarkup(griffe.Extension):
    """Rewrite every docstring of the loaded package once the whole package is known."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self._walk(pkg, seen=set())

    def _walk(self, obj: griffe.Object, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            obj.docstring.value = convert(obj, obj.docstring.value)
        for member in obj.members.values():
            if not member.is_alias:
                self._walk(member, seen)
