"""sources: spec parsing, list splitting, redaction and the directory / glob walkers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cloudbackup.config import split_list
from cloudbackup.core.errors import SourceError
from cloudbackup.core.patterns import PathMatcher
from cloudbackup.sources.base import SourceContext, redact_url, url_secrets
from cloudbackup.sources.directory import DirectorySource
from cloudbackup.sources.glob import GlobSource
from cloudbackup.sources.registry import make_source, parse_spec
from tests.conftest import make_tree


@pytest.mark.parametrize(
    ("text", "items"),
    [
        ("", []),
        ("  \n ", []),
        ("a,b", ["a", "b"]),
        ("a, b ,", ["a", "b"]),
        ("x/{a,b}/*.c,d", ["x/{a,b}/*.c", "d"]),
        ("x/{a,{b,c}},d", ["x/{a,{b,c}}", "d"]),
        ("a\nb", ["a", "b"]),
        ("a\r\n\r\nb\r\n", ["a", "b"]),
        ("a,b\nc", ["a,b", "c"]),  # newlines win: a line may hold a comma
    ],
)
def test_split_list(text: str, items: list[str]) -> None:
    assert split_list(text) == items


@pytest.mark.parametrize(
    ("text", "name", "kind", "spec"),
    [
        ("/srv/www", "www", "directory", "/srv/www"),
        ("/srv/www/", "www", "directory", "/srv/www/"),
        ("/srv/my.site-2", "my.site-2", "directory", "/srv/my.site-2"),
        ("  /srv/www \n", "www", "directory", "/srv/www"),
        ("sqlite:///var/lib/app/app.db", "app", "sqlite", "sqlite:///var/lib/app/app.db"),
        ("data=sqlite:///var/lib/app/app.db", "data", "sqlite", "sqlite:///var/lib/app/app.db"),
        ("postgresql://u@h:5432/shop", "shop", "postgresql", "postgresql://u@h:5432/shop"),
        ("postgres://h/inv%2Dentory", "inv-entory", "postgresql", "postgres://h/inv%2Dentory"),
        ("c=/etc/**/*.{yaml,json}", "c", "glob", "/etc/**/*.{yaml,json}"),
        ("shop=cmd:mysqldump shop", "shop", "command", "cmd:mysqldump shop"),
    ],
)
def test_parse_spec(text: str, name: str, kind: str, spec: str) -> None:
    parsed = parse_spec(text)
    assert (parsed.name, parsed.kind, parsed.spec) == (name, kind, spec)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "empty"),
        ("/etc/*.conf", "needs a name"),
        ("cmd:mysqldump", "needs a name"),
        ("x=cmd:", "needs a command"),
        ("x=cmd:'unterminated", "cannot split"),
        ("sqlite:relative.db", "sqlite:///"),
        ("sqlite://relative.db", "sqlite:///"),
        ("postgresql://u@h:5432/", "no database"),
        ("mysql://u@h/db", "unknown scheme"),
        ("/", "not allowed"),
        ("/srv/caf\u00e9", "not allowed"),
        ("x=relative/*.txt", "absolute"),
    ],
)
def test_parse_spec_rejects(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_spec(text)


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("postgresql://u:pw@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        (
            "postgresql://h/db?sslmode=require&password=pw",
            "postgresql://h/db?sslmode=require&password=***",
        ),
        ("postgresql://u:p%40ss@h/db", "postgresql://u:***@h/db"),
    ],
)
def test_redact_url(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


def test_url_secrets_include_encoded_forms() -> None:
    secrets = url_secrets("postgresql://u:p%40ss@h/db")
    assert "p%40ss" in secrets and "p@ss" in secrets


# ---------------------------------------------------------------- walking


class Recorder:
    def __init__(self) -> None:
        self.warnings: list[tuple[str, str]] = []

    def __call__(self, category: str, message: str) -> None:
        self.warnings.append((category, message))


def ctx_for(
    tmp: Path, exclude: tuple[str, ...] = (), skip: frozenset = frozenset()
) -> tuple[SourceContext, Recorder]:
    recorder = Recorder()
    ctx = SourceContext(
        spool_dir=tmp,
        backup_id="x-20261121T021500Z",
        exclude=PathMatcher(exclude),
        skip_inodes=skip,
        warn=recorder,
    )
    return ctx, recorder


def test_walk_is_sorted_depth_first_and_does_not_follow_symlinks(tmp_path: Path) -> None:
    outside = make_tree(tmp_path / "outside", {"secret.txt": "s"})
    root = make_tree(tmp_path / "src", {"b.txt": "b", "a/z.txt": "z", "a/y/x.txt": "x"})
    (root / "link-dir").symlink_to(outside)
    (root / "link-file").symlink_to("b.txt")
    ctx, recorder = ctx_for(tmp_path)
    names = [e.arcname for e in DirectorySource(parse_spec(str(root))).entries(ctx)]
    assert names == ["a", "a/y", "a/y/x.txt", "a/z.txt", "b.txt", "link-dir", "link-file"]
    assert recorder.warnings == []


def test_top_level_symlink_resolved_once(tmp_path: Path) -> None:
    real = make_tree(tmp_path / "real", {"f": "1"})
    (tmp_path / "current").symlink_to(real)
    source = DirectorySource(parse_spec(str(tmp_path / "current")))
    assert source.name == "current"
    assert source.root == str(real)
    ctx, _ = ctx_for(tmp_path)
    assert [e.arcname for e in source.entries(ctx)] == ["f"]


def test_fifo_skipped_with_a_note(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "src", {"f": "1"})
    os.mkfifo(root / "pipe")
    ctx, recorder = ctx_for(tmp_path)
    assert [e.arcname for e in DirectorySource(parse_spec(str(root))).entries(ctx)] == ["f"]
    assert [c for c, _ in recorder.warnings] == ["skipped"]
    assert "pipe" in recorder.warnings[0][1] and "FIFO" in recorder.warnings[0][1]


def test_skip_inodes_and_excludes(tmp_path: Path) -> None:
    root = make_tree(
        tmp_path / "src",
        {
            "keep.txt": "k",
            "x.tmp": "t",
            "node_modules/m.js": "m",
            "local/arch": "a",
            "sub/x.txt": "x",
        },
    )
    st = os.stat(root / "local")
    ctx, _ = ctx_for(
        tmp_path, ("*.tmp", "node_modules", "sub/x.txt"), frozenset({(st.st_dev, st.st_ino)})
    )
    names = [e.arcname for e in DirectorySource(parse_spec(str(root))).entries(ctx)]
    assert names == ["keep.txt", "sub"]


def test_missing_root_fails_the_source(tmp_path: Path) -> None:
    source = DirectorySource(parse_spec(str(tmp_path / "nope")))
    with pytest.raises(SourceError, match="does not exist"):
        source.check()
    ctx, _ = ctx_for(tmp_path)
    with pytest.raises(SourceError, match="does not exist"):
        list(source.entries(ctx))


def test_file_as_directory_source_fails(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(SourceError, match="not a directory"):
        DirectorySource(parse_spec(str(tmp_path / "f"))).check()


def test_glob_walk_emits_parents_once_and_only_for_matches(tmp_path: Path) -> None:
    base = make_tree(
        tmp_path / "base",
        {
            "top.yaml": "1",
            "d1/x.json": "2",
            "d1/y.txt": "no",
            "d1/d3/w.yaml": "3",
            "d1/d3/v.yml": "no",
            "d2/z.txt": "no",
            "d4/d5/deep.json": "4",
        },
    )
    (base / "linked").symlink_to(base / "d1", target_is_directory=True)
    source = make_source(parse_spec(f"conf={base}/**/*.{{yaml,json}}"))
    assert isinstance(source, GlobSource)
    assert source.base == str(base)
    ctx, _ = ctx_for(tmp_path)
    names = [e.arcname for e in source.entries(ctx)]
    assert names == [
        "d1",
        "d1/d3",
        "d1/d3/w.yaml",
        "d1/x.json",
        "d4",
        "d4/d5",
        "d4/d5/deep.json",
        "top.yaml",
    ]


def test_glob_check_missing_base(tmp_path: Path) -> None:
    source = make_source(parse_spec(f"conf={tmp_path}/nope/*.conf"))
    with pytest.raises(SourceError, match="does not exist"):
        source.check()


def test_a_directory_swapped_for_a_symlink_before_it_is_opened_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The walk saw ``a_user`` as a directory; by the time it opens it (relative to its
    parent, O_NOFOLLOW) it is a symlink to a directory outside: skipped, never followed."""
    from cloudbackup.fs.walk import DirHandle

    root = make_tree(tmp_path / "src", {"a_user/mine.txt": "m", "b.txt": "b"})
    outside = make_tree(tmp_path / "outside", {"secret": "s"})
    original = DirHandle.open_child

    def swap_then_open(self: DirHandle, name: str, st: os.stat_result, fd: int) -> DirHandle:
        if name == "a_user":
            (root / "a_user").rename(tmp_path / "moved")
            (root / "a_user").symlink_to(outside)
        return original(self, name, st, fd)

    monkeypatch.setattr(DirHandle, "open_child", swap_then_open)
    ctx, recorder = ctx_for(tmp_path)
    names = [e.arcname for e in DirectorySource(parse_spec(str(root))).entries(ctx)]
    assert names == ["b.txt"]
    assert recorder.warnings == [
        ("vanished", f"{root}/a_user: replaced during the walk; skipped (never followed)")
    ]


def test_walked_entries_open_through_their_directory(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "src", {"d/e/f.txt": "f", "g.txt": "g"})
    ctx, _ = ctx_for(tmp_path)
    entries = list(DirectorySource(parse_spec(str(root))).entries(ctx))
    assert [(e.arcname, e.name) for e in entries] == [
        ("d", "d"),
        ("d/e", "e"),
        ("d/e/f.txt", "f.txt"),
        ("g.txt", "g.txt"),
    ]
    for entry in entries:
        assert entry.parent is not None
        assert entry.path == f"{root}/{entry.arcname}"
        fd = entry.parent.pin()
        try:
            st = os.stat(entry.name, dir_fd=fd, follow_symlinks=False)
        finally:
            entry.parent.unpin()
        assert (st.st_dev, st.st_ino) == (entry.st.st_dev, entry.st.st_ino)
    directory = entries[1]
    assert directory.handle is not None and directory.handle.ino == directory.st.st_ino


def test_a_symlink_as_the_root_is_refused_when_opened(tmp_path: Path) -> None:
    """The root was resolved once; a symlink there at walk time is not followed."""
    from cloudbackup.sources.directory import walk_tree

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "root").symlink_to(tmp_path / "elsewhere")
    ctx, _ = ctx_for(tmp_path)
    with pytest.raises(SourceError, match="replaced by a symlink"):
        list(walk_tree(str(tmp_path / "root"), ctx))
