"""The one glob dialect: excludes, restore ``--include`` and glob sources.

``*`` and ``?`` match within one path component (a leading dot included, as in gitignore),
``[...]`` is a character class (``[!...]`` or ``[^...]`` negated) that never matches ``/``,
``**`` as a whole component matches zero or more directories, and ``{a,b}`` expands to
alternatives (nested groups allowed; a ``{`` without its ``}``, or a group without a comma,
is literal). There is no backslash escape: write ``[*]`` for a literal ``*``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from itertools import pairwise

__all__ = [
    "PathMatcher",
    "compile_glob",
    "expand_braces",
    "has_wildcard",
    "split_glob",
]

# A pattern like "{a,b}{c,d}..." grows exponentially; stop before it eats the machine.
MAX_ALTERNATIVES = 10_000

_DOUBLE_STAR = "**"
_CLASS_SPECIAL = frozenset("\\]^-[&~|")
_WILDCARD_CHARS = frozenset("*?[{")


def _class_end(text: str, start: int) -> int | None:
    """Index of the ``]`` closing the class opened at ``text[start] == "["``, else None.

    A ``]`` right after ``[`` (or ``[!``) is a member, and a class never spans a ``/``.
    """
    j = start + 1
    if j < len(text) and text[j] in "!^":
        j += 1
    if j < len(text) and text[j] == "]":
        j += 1
    while j < len(text) and text[j] != "]":
        if text[j] == "/":
            return None
        j += 1
    return j if j < len(text) else None


def _match_brace(text: str, start: int) -> tuple[int, list[int]] | None:
    """For the ``{`` at ``start``: index of its ``}`` and of its top-level commas, or None."""
    depth = 0
    commas: list[int] = []
    i = start
    while i < len(text):
        char = text[i]
        if char == "[":
            end = _class_end(text, i)
            if end is not None:
                i = end + 1
                continue
        elif char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i, commas
        elif char == "," and depth == 1:
            commas.append(i)
        i += 1
    return None


def _find_group(text: str, start: int) -> tuple[int, int, list[int]] | None:
    """The first expandable ``{...,...}`` group at or after ``start``."""
    i = start
    while i < len(text):
        char = text[i]
        if char == "[":
            end = _class_end(text, i)
            if end is not None:
                i = end + 1
                continue
        elif char == "{":
            found = _match_brace(text, i)
            if found is not None and found[1]:
                return i, found[0], found[1]
        i += 1
    return None


def expand_braces(pattern: str) -> list[str]:
    """All alternatives of ``pattern``: ``a{b,c{d,e}}`` -> ``["ab", "acd", "ace"]``.

    Raises ValueError when the pattern expands to more than ``MAX_ALTERNATIVES``.
    """
    out: list[str] = []

    def expand(text: str, start: int) -> None:
        group = _find_group(text, start)
        if group is None:
            if len(out) >= MAX_ALTERNATIVES:
                raise ValueError(
                    f"pattern {pattern!r} expands to more than {MAX_ALTERNATIVES} alternatives"
                )
            out.append(text)
            return
        open_, close, commas = group
        prefix, suffix = text[:open_], text[close + 1 :]
        bounds = [open_, *commas, close]
        for left, right in pairwise(bounds):
            # Everything before ``open_`` holds no group, so rescanning starts there.
            expand(prefix + text[left + 1 : right] + suffix, open_)

    expand(pattern, 0)
    return out


def _escape_class_char(char: str) -> str:
    return "\\" + char if char in _CLASS_SPECIAL else char


def _translate_class(body: str) -> str:
    negate = body[:1] in ("!", "^")
    if negate:
        body = body[1:]
    items: list[str] = []
    k = 0
    while k < len(body):
        if k + 2 < len(body) and body[k + 1] == "-":
            low, high = body[k], body[k + 2]
            if low <= high:  # an empty range like [z-a] matches nothing, as in fnmatch
                items.append(f"{_escape_class_char(low)}-{_escape_class_char(high)}")
            k += 3
        else:
            items.append(_escape_class_char(body[k]))
            k += 1
    if negate:
        return "[^/" + "".join(items) + "]"
    if not items:
        return "(?!)"
    # A range such as [!-0] contains "/", which a class must never match.
    return "(?!/)[" + "".join(items) + "]"


def _translate_component(component: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(component):
        char = component[i]
        if char == "*":
            while i < len(component) and component[i] == "*":
                i += 1
            out.append("[^/]*")
            continue
        if char == "?":
            out.append("[^/]")
        elif char == "[":
            end = _class_end(component, i)
            if end is not None:
                out.append(_translate_class(component[i + 1 : end]))
                i = end + 1
                continue
            out.append(re.escape(char))
        else:
            out.append(re.escape(char))
        i += 1
    return "".join(out)


def _components(path: str) -> list[str]:
    return [part for part in path.split("/") if part not in ("", ".")]


def _translate_path(pattern: str) -> str:
    """Regex source (no anchors) for one brace-free pattern, relative to the root."""
    components: list[str] = []
    for component in _components(pattern):
        if component == _DOUBLE_STAR and components and components[-1] == _DOUBLE_STAR:
            continue  # a/**/**/b is a/**/b
        components.append(component)
    out: list[str] = []
    last = len(components) - 1
    for index, component in enumerate(components):
        if component == _DOUBLE_STAR:
            if index < last:
                out.append("(?:.*/)?")  # zero or more directories, each with its "/"
            elif index == 0:
                out.append(".*")  # "**" alone: everything
            else:
                out.append(".+")  # trailing "a/**": everything under a, not a itself
        else:
            out.append(_translate_component(component))
            if index < last:
                out.append("/")
    return "".join(out)


def _join(sources: Sequence[str]) -> re.Pattern[str]:
    return re.compile("(?s:" + "|".join(f"(?:{source})" for source in sources) + r")\Z")


def compile_glob(pattern: str) -> re.Pattern[str]:
    """A regex that full-matches the posix relative paths ``pattern`` describes.

    Use ``.fullmatch()`` (``.match()`` works too: the regex ends with ``\\Z``). A leading
    ``/`` is ignored, as are empty and ``.`` components.
    """
    return _join([_translate_path(alternative) for alternative in expand_braces(pattern)])


class PathMatcher:
    """Exclude / include matching, the same for both.

    A pattern without ``/`` matches a name at any depth; a pattern with ``/`` matches the path
    relative to the root (a leading ``/`` only anchors it); a path also matches when one of
    its parent directories does, so a matched directory brings (or excludes) its subtree.
    Braces are expanded first, so ``{*.tmp,cache/x}`` is one name pattern and one path pattern.
    """

    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns: tuple[str, ...] = tuple(patterns)
        name_sources: list[str] = []
        path_sources: list[str] = []
        for pattern in self.patterns:
            for alternative in expand_braces(pattern):
                stripped = alternative.rstrip("/")
                if not _components(stripped):
                    continue  # "", "/" or "./": matches nothing
                if "/" in stripped:
                    path_sources.append(_translate_path(stripped))
                else:
                    name_sources.append(_translate_path(stripped))
        self._name_re = _join(name_sources) if name_sources else None
        self._path_re = _join(path_sources) if path_sources else None

    def __bool__(self) -> bool:
        return self._name_re is not None or self._path_re is not None

    def __repr__(self) -> str:
        return f"PathMatcher({list(self.patterns)!r})"

    def matches(self, relpath: str) -> bool:
        components = _components(relpath)
        if self._name_re is not None:
            name_re = self._name_re
            if any(name_re.fullmatch(component) for component in components):
                return True
        if self._path_re is not None:
            prefix = ""
            for component in components:
                prefix = f"{prefix}/{component}" if prefix else component
                if self._path_re.fullmatch(prefix):
                    return True
        return False

    def matches_child(self, relpath: str, name: str) -> bool:
        """``matches(relpath)`` for a walk that never enters a matched directory: the parents
        of ``relpath`` are known not to match, so only its last component (``name``) and the
        whole path are tried. Constant work per entry, whatever the depth."""
        if self._name_re is not None and self._name_re.fullmatch(name):
            return True
        return self._path_re is not None and self._path_re.fullmatch(relpath) is not None


def has_wildcard(text: str) -> bool:
    """Whether ``text`` holds ``*``, ``?``, a ``[...]`` class or an expandable ``{a,b}``."""
    if "*" in text or "?" in text:
        return True
    index = text.find("[")
    while index != -1:
        if _class_end(text, index) is not None:
            return True
        index = text.find("[", index + 1)
    return "{" in text and _find_group(text, 0) is not None


def split_glob(pattern: str) -> tuple[str, str]:
    """``/opt/app/config/**/*.{yaml,json}`` -> ``("/opt/app/config", "**/*.{yaml,json}")``.

    The prefix is the directory before the first component holding a wildcard character; the
    rest is the pattern relative to it. Raises ValueError for a relative pattern or one
    without wildcards.
    """
    if not pattern.startswith("/"):
        raise ValueError(f"glob {pattern!r} is not an absolute path")
    if not has_wildcard(pattern):
        raise ValueError(f"glob {pattern!r} has no wildcard (*, ?, [...] or {{a,b}})")
    components = [part for part in pattern.split("/") if part]
    first = next(
        index
        for index, component in enumerate(components)
        if any(char in _WILDCARD_CHARS for char in component)
    )
    return "/" + "/".join(components[:first]), "/".join(components[first:])
