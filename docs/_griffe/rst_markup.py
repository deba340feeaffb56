"""Griffe extension for the API reference: Sphinx markup in Google-style docstrings, rendered as Markdown.

The library's docstrings follow Lightning's style: Google sections (``Args:``, ``Raises:``) with
reStructuredText inside them: roles such as ``:class:`~lightning_worm.PruneAndFinetune``` and literal
blocks introduced by ``Example::``. mkdocstrings renders Markdown, where both would show up verbatim.
Before the docstrings are parsed, this extension rewrites

* a role into inline code, linked to its API reference entry when the target is a documented part of
  ``lightning_worm`` (``~`` keeps only the last name, as in Sphinx; functions and methods get ``()``);
* ``Example::`` / ``Examples::`` followed by an indented block into an ``Examples:`` section holding a
  fenced Python block (doctest blocks, ``>>>``, are left to Griffe, which highlights them itself).

Docstrings already written in Markdown pass through unchanged.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?P<role>class|func|meth|attr|data|mod|exc|obj|const|property):`(?P<target>[^`]+)`")
LITERAL_HEADER = re.compile(r"^(?P<indent>[ \t]*)(?P<title>Examples?)::[ \t]*$")
CALLABLE_ROLES = {"func", "meth"}
PACKAGE = "lightning_worm"


def _resolve(obj: griffe.Object, name: str) -> str | None:
    """The full path of ``name`` as seen from ``obj``, or ``None`` if it cannot be resolved."""
    if name.startswith(PACKAGE + ".") or name == PACKAGE:
        return name
    first, _, rest = name.partition(".")
    try:
        resolved = obj.resolve(first)
    except (griffe.NameResolutionError, AttributeError, KeyError):
        return None
    return f"{resolved}.{rest}" if rest else resolved


def _rendered(obj: griffe.Object, path: str) -> bool:
    """Whether the API reference renders ``path``: a public module, or a public object with a docstring."""
    if path == PACKAGE:
        return True
    relative = path[len(PACKAGE) + 1 :]
    if any(part.startswith("_") for part in relative.split(".")):
        return False
    try:
        target = obj.package[relative]
        return bool(target.is_module or target.docstring)
    except Exception:  # unknown name, or an alias that does not resolve
        return False


def _role(obj: griffe.Object, match: re.Match[str]) -> str:
    role, target = match.group("role"), match.group("target").strip()
    shorten = target.startswith("~")
    target = target.lstrip("~")
    title = target.rsplit(".", 1)[-1] if shorten else target
    if role in CALLABLE_ROLES:
        title += "()"
    path = _resolve(obj, target)
    if path is None or not (path + ".").startswith(PACKAGE + ".") or not _rendered(obj, path):
        return f"`{title}`"  # no page to link to: torch, Lightning, matplotlib, examples, undocumented members
    return f"[`{title}`][{path}]"


def _literal_blocks(text: str) -> str:
    """``Example::`` + indented block -> ``Examples:`` section with a fenced block (doctests left as they are)."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        header = LITERAL_HEADER.match(lines[i])
        if header is None:
            out.append(lines[i])
            i += 1
            continue
        indent = header.group("indent")
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        block: list[str] = []
        while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > len(indent)):
            block.append(lines[j])
            j += 1
        while block and not block[-1].strip():
            block.pop()
        if not block:  # not a literal block after all
            out.append(lines[i])
            i += 1
            continue
        margin = min(len(line) - len(line.lstrip()) for line in block if line.strip())
        code = [line[margin:] for line in block]
        body = indent + "    "
        out.append(f"{indent}Examples:")
        if code[0].lstrip().startswith(">>>"):
            out.extend(body + line if line else "" for line in code)
        else:
            out.append(body + "```python")
            out.extend(body + line if line else "" for line in code)
            out.append(body + "```")
        out.append("")
        i = j
    return "\n".join(out)


def rewrite(obj: griffe.Object, text: str) -> str:
    """The docstring ``text`` of ``obj`` with its Sphinx markup turned into Markdown."""
    text = _literal_blocks(text)
    return ROLE.sub(lambda m: _role(obj, m), text)


class SphinxMarkupToMarkdown(griffe.Extension):
    """Rewrites every docstring of the loaded package once it is fully loaded (so names resolve)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """Called by Griffe once the whole package is loaded."""
        self._rewrite_all(pkg)

    def on_package_loaded(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """The name older Griffe versions use for the same event (a second rewrite changes nothing)."""
        self._rewrite_all(pkg)

    @staticmethod
    def _rewrite_all(pkg: griffe.Module) -> None:
        seen: set[int] = set()
        stack: list[griffe.Object] = [pkg]
        while stack:
            obj = stack.pop()
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if obj.docstring is not None:
                obj.docstring.value = rewrite(obj, obj.docstring.value)
            stack.extend(member for member in obj.members.values() if not member.is_alias)
