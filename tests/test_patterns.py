"""The glob dialect shared by excludes, restore --include and glob sources."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudbackup.core.patterns import (
    MAX_ALTERNATIVES,
    PathMatcher,
    compile_glob,
    expand_braces,
    has_wildcard,
    split_glob,
)


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("abc", ["abc"]),
        ("", [""]),
        ("{a,b}", ["a", "b"]),
        ("x{a,b}y", ["xay", "xby"]),
        ("*.{yaml,json}", ["*.yaml", "*.json"]),
        ("a{b,c{d,e}}f", ["abf", "acdf", "acef"]),
        ("{a,b}{c,d}", ["ac", "ad", "bc", "bd"]),
        ("x{,y}", ["x", "xy"]),
        ("{a,b/c}/d", ["a/d", "b/c/d"]),
        # a "{" without its "}" is literal, and so is a group without a comma
        ("{a", ["{a"]),
        ("a}", ["a}"]),
        ("{a}", ["{a}"]),
        ("{a{b,c}", ["{ab", "{ac"]),
        ("{q{a,b}}", ["{qa}", "{qb}"]),
        ("a,b", ["a,b"]),
        # braces and commas inside a character class are members of the class
        ("[{]{a,b}", ["[{]a", "[{]b"]),
        ("{[,],x}", ["[,]", "x"]),
    ],
)
def test_expand_braces(pattern: str, expected: list[str]) -> None:
    assert expand_braces(pattern) == expected


def test_expand_braces_refuses_an_explosion() -> None:
    with pytest.raises(ValueError, match="alternatives"):
        expand_braces("{a,b}" * 20)
    assert len(expand_braces("{a,b,c,d,e,f,g,h,i,j}" * 4)) == MAX_ALTERNATIVES


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("*.txt", "a.txt", True),
        ("*.txt", ".hidden.txt", True),
        ("*.txt", "d/a.txt", False),  # * never crosses /
        ("*", "a/b", False),
        ("?", "a", True),
        ("?", "/", False),
        ("a?c", "a/c", False),
        ("a/*/c", "a/b/c", True),
        ("a/*/c", "a/b/x/c", False),
        ("a/**/b", "a/b", True),
        ("a/**/b", "a/x/b", True),
        ("a/**/b", "a/x/y/b", True),
        ("a/**/b", "a/xb", False),
        ("a/**/b", "ab", False),
        ("a/**/**/b", "a/b", True),
        ("**/b", "b", True),
        ("**/b", "x/y/b", True),
        ("**/b", "x/yb", False),
        ("a/**", "a", False),  # everything under a, not a itself
        ("a/**", "a/b", True),
        ("a/**", "a/b/c", True),
        ("a/**", "ab/c", False),
        ("**", "anything/at/all", True),
        ("x**y", "xay", True),  # ** inside a component is a plain *
        ("x**y", "xa/y", False),
        ("[abc].txt", "b.txt", True),
        ("[abc].txt", "d.txt", False),
        ("[a-c]", "b", True),
        ("[!a-c]", "b", False),
        ("[!a-c]", "d", True),
        ("[^a-c]", "d", True),
        ("[]]", "]", True),
        ("[!]]", "a", True),
        ("[!]]", "]", False),
        ("[a-]", "-", True),
        ("[z-a]x", "zx", False),  # an empty range matches nothing
        ("[!-0]", "/", False),  # a class never matches /
        ("[!z-a]", "q", True),
        ("[abc", "[abc", True),  # unclosed class: literal
        ("[a/b]", "[a/b]", True),  # a class never spans /
        ("[*]", "*", True),
        ("[*]", "x", False),
        ("a.b", "axb", False),  # regex metacharacters are literal
        ("(x)+", "(x)+", True),
        ("$^\\", "$^\\", True),
        ("[&&]", "&", True),
        ("*.{yaml,json}", "c.json", True),
        ("*.{yaml,json}", "c.toml", False),
        ("{a,b}/**/*.py", "b/x/y.py", True),
        ("/a/b", "a/b", True),  # a leading / is ignored here
        ("./a//b", "a/b", True),
        ("caf\u00e9", "caf\u00e9", True),
        ("*\udce9*", "caf\udce9", True),  # a non-UTF-8 byte decoded with surrogateescape
    ],
)
def test_compile_glob(pattern: str, path: str, expected: bool) -> None:
    regex = compile_glob(pattern)
    assert isinstance(regex, re.Pattern)
    assert bool(regex.fullmatch(path)) is expected
    assert bool(regex.match(path)) is expected  # anchored at the end too


@pytest.mark.parametrize(
    ("patterns", "path", "expected"),
    [
        # a pattern without / matches a name at any depth, and that name's subtree
        (["*.tmp"], "x.tmp", True),
        (["*.tmp"], "a/b/x.tmp", True),
        (["*.tmp"], "a/b/x.tmpl", False),
        (["node_modules"], "node_modules", True),
        (["node_modules"], "web/node_modules", True),
        (["node_modules"], "web/node_modules/react/index.js", True),
        (["node_modules"], "web/node_modules2/x", False),
        (["cache"], "cached", False),
        (["a.tmp/"], "x/a.tmp/y", True),  # a trailing / changes nothing
        # a pattern with / matches from the root; a leading / only anchors
        (["docs/*.md"], "docs/a.md", True),
        (["docs/*.md"], "x/docs/a.md", False),
        (["/top"], "top", True),
        (["/top"], "top/below", True),
        (["/top"], "x/top", False),
        (["a/b"], "a/b/c/d", True),  # a matched directory brings its subtree
        (["a/b"], "a", False),
        (["a/b"], "a/bc", False),
        # ** crosses directories
        (["**/cache/**"], "x/y/cache/z", True),
        (["**/cache/**"], "cache/z", True),
        (["**/cache/**"], "cache", False),
        (["**/*.log"], "a/b/c.log", True),
        (["a/**/*.log"], "a/c.log", True),
        (["a/**/*.log"], "b/c.log", False),
        (["*"], "anything/at/all", True),
        (["**"], "x", True),
        # several patterns, braces per alternative
        (["*.tmp", "build"], "src/build/out.o", True),
        (["{*.tmp,var/cache}"], "deep/x.tmp", True),
        (["{*.tmp,var/cache}"], "var/cache/a", True),
        (["{*.tmp,var/cache}"], "x/var/cache/a", False),
        # paths are normalised
        (["a/b"], "./a/b", True),
        (["a/b"], "a//b/", True),
        (["x"], "", False),
        (["caf\udce9"], "d/caf\udce9/f", True),
        # empty patterns match nothing
        ([""], "a", False),
        (["/"], "a", False),
        ([], "a", False),
    ],
)
def test_path_matcher(patterns: list[str], path: str, expected: bool) -> None:
    assert PathMatcher(patterns).matches(path) is expected


def test_path_matcher_truthiness() -> None:
    assert not PathMatcher([])
    assert not PathMatcher(())
    assert not PathMatcher(["", "/"])
    assert PathMatcher(["*.tmp"])
    assert PathMatcher(["a/b"])
    assert "*.tmp" in repr(PathMatcher(["*.tmp"]))


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("/opt/app/config/**/*.{yaml,json}", ("/opt/app/config", "**/*.{yaml,json}")),
        ("/etc/*.conf", ("/etc", "*.conf")),
        ("/*.conf", ("/", "*.conf")),
        ("/srv/www/site?/index.html", ("/srv/www", "site?/index.html")),
        ("/srv/[ab]/x", ("/srv", "[ab]/x")),
        ("/srv/{a,b}/x", ("/srv", "{a,b}/x")),
        ("/srv/{a,b/c}/x", ("/srv", "{a,b/c}/x")),
        ("//srv//data/**", ("/srv/data", "**")),
    ],
)
def test_split_glob(pattern: str, expected: tuple[str, str]) -> None:
    assert split_glob(pattern) == expected


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("opt/*.conf", "not an absolute path"),
        ("*.conf", "not an absolute path"),
        ("", "not an absolute path"),
        ("/opt/app/config", "no wildcard"),
        ("/opt/a{b", "no wildcard"),
        ("/opt/[ab", "no wildcard"),
    ],
)
def test_split_glob_errors(pattern: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split_glob(pattern)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain/path", False),
        ("a*", True),
        ("a?", True),
        ("[ab]", True),
        ("[ab", False),
        ("{a,b}", True),
        ("{a}", False),
        ("a{b", False),
        ("a}b", False),
        ("", False),
    ],
)
def test_has_wildcard(text: str, expected: bool) -> None:
    assert has_wildcard(text) is expected


def test_split_glob_rest_matches_what_the_whole_pattern_means() -> None:
    prefix, rest = split_glob("/opt/app/config/**/*.{yaml,json}")
    regex = compile_glob(rest)
    assert prefix == "/opt/app/config"
    assert regex.fullmatch("a.yaml")
    assert regex.fullmatch("sub/dir/b.json")
    assert not regex.fullmatch("sub/c.txt")


# --- properties -----------------------------------------------------------------------------

_PATTERN_CHARS = st.sampled_from(list("ab*?[]{},/!^-.\\") + ["**", "\udce9", "\u00e9", " "])
_PATTERNS = st.lists(_PATTERN_CHARS, max_size=24).map("".join)
_NAMES = st.text(
    alphabet=st.sampled_from(list("ab.-*?[]{}, ") + ["\udce9", "\u00e9", "\udcff"]),
    min_size=1,
    max_size=6,
)
_PATHS = st.lists(_NAMES, min_size=1, max_size=5).map("/".join)


@settings(max_examples=300, deadline=None)
@given(patterns=st.lists(_PATTERNS, max_size=3), path=_PATHS)
def test_matching_never_crashes(patterns: list[str], path: str) -> None:
    matcher = PathMatcher(patterns)
    result = matcher.matches(path)
    assert isinstance(result, bool)
    for pattern in patterns:
        compile_glob(pattern).fullmatch(path)
        has_wildcard(pattern)
        try:
            split_glob("/" + pattern)
        except ValueError:
            pass


@settings(max_examples=200, deadline=None)
@given(patterns=st.lists(_PATTERNS, max_size=3), path=_PATHS, below=_NAMES)
def test_a_matched_path_brings_its_subtree(patterns: list[str], path: str, below: str) -> None:
    matcher = PathMatcher(patterns)
    if matcher.matches(path):
        assert matcher.matches(f"{path}/{below}")


@settings(max_examples=200, deadline=None)
@given(path=_PATHS)
def test_a_literal_path_matches_itself(path: str) -> None:
    # A name without wildcard characters is a literal pattern.
    literal = "".join(char for char in path if char not in "*?[]{}")
    if not literal.strip("/.") or "//" in literal:
        return
    parts = [part for part in literal.split("/") if part not in ("", ".")]
    if not parts:
        return
    normalised = "/".join(parts)
    assert compile_glob(normalised).fullmatch(normalised)
    assert PathMatcher([normalised]).matches(normalised)
    assert PathMatcher([parts[-1]]).matches(normalised)


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab/.- ") + ["\udce9"]), max_size=20))
def test_text_without_specials_expands_to_itself(text: str) -> None:
    assert expand_braces(text) == [text]
    assert not has_wildcard(text)


@settings(max_examples=300, deadline=None)
@given(
    patterns=st.lists(_PATTERNS, max_size=3),
    names=st.lists(_NAMES.filter(lambda n: n not in (".", "..")), min_size=1, max_size=5),
)
def test_matches_child_is_matches_for_a_walk_that_prunes_matched_directories(
    patterns: list[str], names: list[str]
) -> None:
    """The walk asks only about paths whose parents did not match (a matched directory is
    not entered): there, one match on the last name and the whole path says the same."""
    matcher = PathMatcher(patterns)
    for depth in range(1, len(names) + 1):
        path = "/".join(names[:depth])
        assert matcher.matches_child(path, names[depth - 1]) == matcher.matches(path)
        if matcher.matches(path):
            break
