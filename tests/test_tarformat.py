"""tarformat: our headers are what tarfile writes, and our parser of them is what tarfile
reads (or gives way to it), for our headers, other writers' and damaged ones."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable

from hypothesis import given, settings
from hypothesis import strategies as st

from cloudbackup.stream import tarformat

# ---------------------------------------------------------------- writing

NS = 1_000_000_000


def _without_dev_and_checksum(block: bytes) -> bytes:
    return block[:148] + bytes(8) + block[156:329] + bytes(16) + block[345:]


def _header_blocks(data: bytes) -> list[int]:
    """Offsets of the header blocks of one member's header bytes (extended header first)."""
    offsets, offset = [], 0
    while offset < len(data):
        offsets.append(offset)
        info = tarfile.TarInfo.frombuf(data[offset : offset + 512], "utf-8", "surrogateescape")
        offset += 512
        if info.type in (tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME):
            offset += -(-info.size // 512) * 512
    return offsets


@settings(max_examples=400, deadline=None)
@given(
    name=st.text(alphabet=st.sampled_from("abcXYZ019._-/é\udcff"), min_size=1, max_size=130).filter(
        lambda n: not n.startswith("/")
    ),
    kind=st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE]),
    linkname=st.text(alphabet=st.sampled_from("ab/.é"), max_size=120),
    mode=st.integers(0, 0o177777),
    uid=st.sampled_from([0, 1000, 0o7777776, 0o7777777, 2**32 - 1]),
    size=st.sampled_from([0, 1, 511, 512, 10**9, 0o77777777777, 0o77777777777 + 1]),
    mtime_ns=st.one_of(
        st.sampled_from([0, 1_700_000_000 * NS, 0o77777777777 * NS, 2**40 * NS]),
        st.integers(-(2**35) * NS, 2**40 * NS),
        st.integers(0, 2**33).map(lambda s: s * NS + 500_000_000),
    ),
    xattrs=st.dictionaries(
        st.sampled_from(["user.a", "user.comment", "security.selinux", "trusted.x"]),
        st.one_of(st.binary(max_size=60), st.text(max_size=20).map(str.encode)),
        max_size=3,
    ),
)
def test_tar_headers_are_byte_identical_to_tarfile(
    name: str,
    kind: bytes,
    linkname: str,
    mode: int,
    uid: int,
    size: int,
    mtime_ns: int,
    xattrs: dict[str, bytes],
) -> None:
    """Our headers (the fast ustar path, the cached sub-second mtime header, xattr records
    with hdrcharset=BINARY) are what tarfile writes for the same member."""
    records = {
        tarformat.XATTR_PREFIX + key: value.decode("utf-8", "surrogateescape")
        for key, value in sorted(xattrs.items())
    }
    linkname = linkname if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
    size = size if kind == tarfile.REGTYPE else 0
    ours = tarformat.member_header(name, kind, mode, uid, uid, size, mtime_ns, linkname, records)
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode, info.uid, info.gid = mode, uid, uid
    info.size = size
    info.mtime = mtime_ns // NS
    info.uname = info.gname = ""
    info.pax_headers = {"mtime": tarformat.pax_time(mtime_ns)} if mtime_ns % NS else {}
    info.pax_headers.update(records)
    expected = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    if ours != expected:
        # Early 3.11 patch releases wrote "0000000\0" into the device fields of every header;
        # both are valid tar. Compare the rest, and check our checksums on their own.
        assert len(ours) == len(expected)
        blocks = _header_blocks(expected)
        assert _header_blocks(ours) == blocks
        for offset in blocks:
            tarfile.TarInfo.frombuf(ours[offset : offset + 512], "utf-8", "surrogateescape")
            ours = (
                ours[:offset]
                + _without_dev_and_checksum(ours[offset : offset + 512])
                + ours[offset + 512 :]
            )
            expected = (
                expected[:offset]
                + _without_dev_and_checksum(expected[offset : offset + 512])
                + expected[offset + 512 :]
            )
        assert ours == expected
    # And tarfile reads back the exact time and attributes.
    with tarfile.open(fileobj=io.BytesIO(ours), mode="r:", errors="surrogateescape") as tar:
        member = tar.next()  # reads the headers only
        assert member is not None
    if mtime_ns % NS:
        assert member.pax_headers["mtime"] == tarformat.pax_time(mtime_ns)
    for key, value in records.items():
        assert member.pax_headers[key].encode("utf-8", "surrogateescape") == value.encode(
            "utf-8", "surrogateescape"
        )


def test_the_largest_fast_path_headers_are_tarfile_s() -> None:
    """The ustar checksum comes from adler32, which sums modulo 65,521: the largest sums the
    fast path can meet (100-byte names and links of the highest ASCII byte, the largest
    octal numbers) still match tarfile."""
    for kind, link in ((tarfile.SYMTYPE, "\x7f" * 100), (tarfile.REGTYPE, "")):
        name = "\x7f" * 100
        ours = tarformat.member_header(
            name, kind, 0o7777, 0o7777776, 0o7777776, 0, 0o77777777776 * NS + 1, link
        )
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, link
        info.mode, info.uid, info.gid, info.size = 0o7777, 0o7777776, 0o7777776, 0
        info.mtime = 0o77777777776
        info.uname = info.gname = ""
        info.pax_headers = {"mtime": tarformat.pax_time(0o77777777776 * NS + 1)}
        expected = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        assert ours[-512:][:148] == expected[-512:][:148]
        assert ours[-512:][148:156] == expected[-512:][148:156]  # the checksum field
        assert len(ours) == len(expected)
        tarfile.TarInfo.frombuf(ours[-512:], "utf-8", "surrogateescape")  # checksum accepted


# ---------------------------------------------------------------- reading

_FIELDS = (
    "name", "type", "mode", "uid", "gid", "size", "mtime", "chksum", "linkname", "uname",
    "gname", "devmajor", "devminor", "pax_headers", "offset", "offset_data", "sparse",
)  # fmt: skip


def _tarfile_parse(data: bytes) -> tuple[tarfile.TarInfo, int] | None:
    """What tarfile makes of the first member of ``data`` and where the next header is."""
    try:
        with tarfile.open(
            fileobj=io.BytesIO(data), mode="r:", encoding="utf-8", errors="surrogateescape"
        ) as tar:
            member = tar.next()
            return (member, tar.offset) if member is not None else None
    except tarfile.TarError:
        return None


def _assert_same_as_tarfile(data: bytes) -> bool:
    """The fast parser gives up, or agrees with tarfile field for field; True if it parsed."""
    fast = tarformat._fast_member(data, 0)
    if fast is None:
        return False
    expected = _tarfile_parse(data)
    assert expected is not None, "parsed a header that tarfile refuses"
    ours, ours_next = fast
    theirs, theirs_next = expected
    assert {f: getattr(ours, f) for f in _FIELDS} == {f: getattr(theirs, f) for f in _FIELDS}
    assert ours_next == theirs_next
    return True


_names = st.text(alphabet=st.sampled_from("ab/._-é\udcff"), min_size=1, max_size=120).filter(
    lambda n: n.strip("/")
)


@settings(max_examples=300, deadline=None)
@given(
    name=_names,
    kind=st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE]),
    linkname=st.text(alphabet=st.sampled_from("ab/.é"), max_size=120),
    mode=st.integers(0, 0o7777),
    uid=st.sampled_from([0, 1000, 0o7777776, 2**21]),
    size=st.integers(0, 1500),
    mtime_ns=st.one_of(st.integers(0, 2**34 * 10**9), st.integers(-(10**18), 0)),
    xattrs=st.dictionaries(
        st.sampled_from(["user.a", "user.comment", "security.selinux"]),
        st.binary(max_size=40),
        max_size=2,
    ),
    mutation=st.one_of(st.none(), st.tuples(st.integers(0, 3071), st.integers(0, 255))),
)
def test_the_fast_header_parser_is_tarfile_for_our_headers(
    name: str,
    kind: bytes,
    linkname: str,
    mode: int,
    uid: int,
    size: int,
    mtime_ns: int,
    xattrs: dict[str, bytes],
    mutation: tuple[int, int] | None,
) -> None:
    records = {
        tarformat.XATTR_PREFIX + key: value.decode("utf-8", "surrogateescape")
        for key, value in xattrs.items()
    }
    size = size if kind == tarfile.REGTYPE else 0
    linkname = linkname if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
    header = tarformat.member_header(name, kind, mode, uid, uid, size, mtime_ns, linkname, records)
    data = bytearray(header + bytes(-(-size // 512) * 512) + bytes(1024))
    parsed = _assert_same_as_tarfile(bytes(data))
    if name.isascii() and len(name) < 100 and linkname.isascii() and 0 <= mtime_ns:
        plain = not any(b"hdrcharset=" in value for value in xattrs.values())
        if plain and uid < 0o7777777 and mtime_ns < 0o77777777777 * 10**9:
            assert parsed, "one of our plain headers fell back to tarfile"
    if mutation is not None:
        position, value = mutation
        data[position % len(header)] = value
        _assert_same_as_tarfile(bytes(data))


@settings(max_examples=200, deadline=None)
@given(
    name=_names,
    kind=st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.AREGTYPE]),
    fmt=st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]),
    owner=st.sampled_from(["", "root", "über"]),
    mtime=st.one_of(st.integers(0, 2**33), st.floats(0, 2**33)),
)
def test_the_fast_header_parser_gives_way_or_agrees_on_other_writers(
    name: str, kind: bytes, fmt: int, owner: str, mtime: float
) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mtime = mtime
    info.uname = info.gname = owner
    if kind == tarfile.SYMTYPE:
        info.linkname = "target"
    try:
        header = info.tobuf(fmt, "utf-8", "surrogateescape")
    except ValueError:
        return  # a name this format cannot hold
    _assert_same_as_tarfile(header + bytes(1024))


def _mixed_archive() -> tuple[bytes, dict[str, bytes]]:
    """Our members, then tarfile's (a GNU long name, a global PAX header), then ours again."""
    contents = {"ours/a.txt": b"alpha", "ours/b": b"", "theirs/" + "long" * 40: b"gnu"}
    out = io.BytesIO()
    for name in ("ours/a.txt", "ours/b"):
        data = contents[name]
        out.write(
            tarformat.member_header(name, tarfile.REGTYPE, 0o644, 0, 0, len(data), 10**18 + 5)
        )
        out.write(data + bytes(-len(data) % 512))
    info = tarfile.TarInfo("theirs/" + "long" * 40)
    info.size = 3
    out.write(info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape") + b"gnu" + bytes(509))
    out.write(tarfile.TarInfo.create_pax_global_header({"comment": "from now on"}))
    contents["ours/c"] = b"later"
    out.write(tarformat.member_header("ours/c", tarfile.REGTYPE, 0o600, 1, 2, 5, 2 * 10**18 + 1))
    out.write(b"later" + bytes(507))
    return out.getvalue(), contents


def test_the_reader_mixes_its_parser_and_tarfile_and_reads_data() -> None:
    stream, contents = _mixed_archive()
    seen = {}
    with tarformat.TarReader(io.BytesIO(stream + bytes(1024))) as tar:  # type: ignore[arg-type]
        for member in tar:
            reader = tar.data(member)
            assert reader is not None
            seen[member.name] = reader.read(member.size)
            if member.name == "ours/c":  # parsed by tarfile: a global header applies to it
                assert member.pax_headers["comment"] == "from now on"
    assert seen == contents


def test_the_reader_refuses_a_stream_without_its_end_blocks() -> None:
    stream, _ = _mixed_archive()
    with tarformat.TarReader(io.BytesIO(stream)) as tar:  # type: ignore[arg-type]
        members = []
        try:
            for member in tar:
                members.append(member.name)
        except tarfile.ReadError as exc:
            assert "end-of-archive" in str(exc)
        else:
            raise AssertionError("a stream cut after a member was accepted")
    assert len(members) == 4


class _Trickle:
    """A stream that hands out at most ``step`` bytes per read, as a decompressor may."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data, self._pos, self._step = data, 0, step
        self.reads = 0

    def read(self, size: int = -1) -> bytes:
        self.reads += 1
        end = self._pos + min(self._step, size if size >= 0 else len(self._data))
        piece = self._data[self._pos : end]
        self._pos += len(piece)
        return piece


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 5000), min_size=1, max_size=12),
    piece=st.sampled_from([512, 700, 4096, 1 << 20]),
    step=st.sampled_from([1, 333, 512, 1 << 20]),
    others=st.booleans(),
    take=st.sampled_from(["headers", "tarinfo"]),
)
def test_the_reader_slices_members_out_of_any_pieces_the_stream_gives(
    sizes: list[int], piece: int, step: int, others: bool, take: str
) -> None:
    """Members (ours, and with ``others`` tarfile's in between) read whole, in chunks or
    skipped give the archive's bytes whatever the pieces read and the stream's short reads
    (the reader's buffer refills, keeps and skips across every boundary)."""
    out = io.BytesIO()
    contents = {}
    for number, size in enumerate(sizes):
        name = f"d/{number}"
        data = bytes((number + i) % 251 for i in range(size))
        contents[name] = data
        if others and number % 2:
            info = tarfile.TarInfo(name + "/" + "long" * 30)  # a GNU long name: tarfile's
            info.size = size
            out.write(info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape"))
            contents[info.name] = contents.pop(name)
        else:
            out.write(tarformat.member_header(name, tarfile.REGTYPE, 0o644, 0, 0, size, NS + 7))
        out.write(data + bytes(-size % 512))
    stream = _Trickle(out.getvalue() + bytes(1024), step)
    seen = {}
    original = tarformat._PIECE
    tarformat._PIECE = piece
    try:
        with tarformat.TarReader(stream) as tar:  # type: ignore[arg-type]
            members: Iterable[tarformat.Header | tarfile.TarInfo]
            members = tar.headers() if take == "headers" else iter(tar)
            for number, member in enumerate(members):
                if number % 3 == 2:
                    continue  # skipped: read through
                if number % 3 == 1 and isinstance(member, tarformat.Header):
                    whole = tar.whole(member)
                    assert isinstance(whole, (bytes, memoryview))  # a view: no copy
                    seen[member.name] = bytes(whole)
                    continue
                reader = tar.data(member)
                assert reader is not None
                chunks = []
                while chunk := reader.read(1000):
                    chunks.append(chunk)
                seen[member.name] = b"".join(chunks)
    finally:
        tarformat._PIECE = original
    assert seen == {
        name: data for number, (name, data) in enumerate(contents.items()) if number % 3 != 2
    }


def test_the_reader_asks_the_stream_for_large_pieces() -> None:
    """Many small members cost a read of the stream per megabyte, not per member."""
    out = io.BytesIO()
    for number in range(2000):
        out.write(tarformat.member_header(f"f{number}", tarfile.REGTYPE, 0o644, 0, 0, 100, NS))
        out.write(bytes(512))
    stream = _Trickle(out.getvalue() + bytes(1024), 1 << 20)
    with tarformat.TarReader(stream) as tar:  # type: ignore[arg-type]
        for member in tar.headers():
            tar.whole(member)
    assert stream.reads <= 4  # 2 MB of archive: two pieces, then the end
