"""Header hints: what a decompression child parses ahead is exactly what the reader would
parse, is taken only at the offset the reader is at, and never changes what is extracted."""

from __future__ import annotations

import io
import os
import tarfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudbackup.stream import tarformat
from cloudbackup.stream.extract import extract
from cloudbackup.stream.hints import HeaderHints, HeaderScanner, frame
from cloudbackup.stream.tarformat import TarReader

NS = 1_700_000_000_123_456_789


def _ours(sizes: list[int], *, foreign_at: int | None = None) -> bytes:
    """An archive as the writer makes it (a directory, files with sub-second mtimes, a
    symlink), with a GNU long-name member (tarfile's to parse) at ``foreign_at``."""
    out = io.BytesIO()
    out.write(tarformat.member_header("d", tarfile.DIRTYPE, 0o755, 0, 0, 0, NS))
    for number, size in enumerate(sizes):
        name = f"d/{number}"
        if number == foreign_at:
            info = tarfile.TarInfo(name + "-" + "long" * 30)  # a GNU long name
            info.size = size
            out.write(info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape"))
        else:
            out.write(tarformat.member_header(name, tarfile.REGTYPE, 0o644, 0, 0, size, NS))
        out.write(bytes((number + i) % 251 for i in range(size)) + bytes(-size % 512))
    out.write(tarformat.member_header("d/link", tarfile.SYMTYPE, 0o777, 0, 0, 0, NS, "0"))
    return out.getvalue() + bytes(1024)


def _reader_headers(data: bytes) -> dict[int, tarformat.Header]:
    with TarReader(io.BytesIO(data)) as tar:  # type: ignore[arg-type]
        return {header.offset: header for header in tar.headers()}


def _scan(data: bytes, step: int) -> tuple[list[tuple[object, ...]], bool]:
    scanner = HeaderScanner()
    entries = []
    for start in range(0, len(data), step):
        entries += scanner.feed(data[start : start + step])
    return entries, scanner.done


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 9000), min_size=1, max_size=10),
    step=st.sampled_from([1, 511, 512, 4096, 5000, 1 << 20]),
)
def test_the_scanner_gives_the_reader_s_own_headers_whatever_the_pieces(
    sizes: list[int], step: int
) -> None:
    data = _ours(sizes)
    entries, done = _scan(data, step)
    expected = _reader_headers(data)
    # Every member but those whose header ends in the last 9 blocks of the stream (the
    # scanner waits for as much as the reader's fast parser looks at), in order.
    assert entries
    assert [entry[10] for entry in entries] == sorted(expected)[: len(entries)]
    for entry in entries[1:]:  # the first member is tarfile's to read (the reader never asks)
        header = tarformat.Header._make(entry[:-1])
        assert header == expected[header.offset]
        following = [offset for offset in sorted(expected) if offset > header.offset]
        assert entry[-1] == (following[0] if following else entry[-1])
    # ... and every one whose header the scanner saw whole, the end blocks not being one.
    seen_whole = [o for o in sorted(expected) if o + tarformat.FAST_HEADER_BYTES <= len(data)]
    assert [entry[10] for entry in entries] == seen_whole
    assert not done  # the two end blocks are fewer than it waits for: no verdict on them


def test_the_scanner_stops_for_good_at_a_header_it_leaves_to_tarfile() -> None:
    data = _ours([10, 20, 30, 40], foreign_at=2)
    entries, done = _scan(data, 700)
    names = [entry[0] for entry in entries]
    assert names == ["d", "d/0", "d/1"]
    assert done


def _hints_of(entries: list[tuple[object, ...]]) -> tuple[HeaderHints, threading.Thread]:
    read, write = os.pipe()

    def feed() -> None:
        with open(write, "wb") as pipe:
            for start in range(0, len(entries), 3):  # several frames
                pipe.write(frame(entries[start : start + 3]))

    writer = threading.Thread(target=feed)
    writer.start()
    return HeaderHints(read), writer


def test_hints_are_taken_only_at_the_reader_s_offset() -> None:
    data = _ours([100, 2000, 0, 5000, 1])
    entries, _ = _scan(data, 1 << 20)
    hints, writer = _hints_of(entries)
    writer.join()
    offsets = [entry[10] for entry in entries]
    assert hints.take(offsets[0] + 1) is None  # no member starts there
    header, following = hints.take(offsets[1]) or (None, None)  # the first: dropped
    assert header is not None and header.offset == offsets[1] and following == offsets[2]
    assert hints.take(offsets[1]) is None  # taken once
    assert hints.take(offsets[-1]) is not None
    assert hints.take(offsets[-1] + 512) is None  # none left, the pipe at its end
    hints.close()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=8),
    foreign=st.one_of(st.none(), st.integers(0, 7)),
    drop=st.sets(st.integers(0, 12), max_size=4),
)
def test_extraction_with_hints_is_extraction_without(
    tmp_path_factory: pytest.TempPathFactory,
    sizes: list[int],
    foreign: int | None,
    drop: set[int],
) -> None:
    """Whatever hints arrive (all, some missing, none after a foreign header), the tree
    and the result are the same as the reader's own parse gives."""
    data = _ours(sizes, foreign_at=foreign)
    entries, _ = _scan(data, 4096)
    entries = [entry for number, entry in enumerate(entries) if number not in drop]
    base = tmp_path_factory.mktemp("hints")
    plain, hinted = base / "plain", base / "hinted"
    plain.mkdir()
    hinted.mkdir()
    expected = extract(io.BytesIO(data), plain)  # type: ignore[arg-type]
    hints, writer = _hints_of(entries)
    writer.join()
    try:
        got = extract(io.BytesIO(data), hinted, hints=hints)  # type: ignore[arg-type]
    finally:
        hints.close()
    assert got == expected
    assert _snapshot(hinted) == _snapshot(plain)


def _snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st_ = path.lstat()
            body = path.read_bytes() if path.is_file() and not path.is_symlink() else b""
            out[str(path.relative_to(root))] = (st_.st_mode, st_.st_mtime_ns, st_.st_size, body)
    return out
