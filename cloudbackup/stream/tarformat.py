"""The tar format both ways: the member headers the archive writer builds, and a
forward-only reader that parses those headers itself and leaves every other to tarfile.

Headers are PAX (POSIX.1-2001): a ustar block per member, preceded by an extended header
when the member needs one (a sub-second mtime, extended attributes, a long or non-UTF-8
name). Building and parsing them with tarfile's generic code costs more than archiving or
extracting a small file, so the common cases are done here, byte for byte as tarfile does
them (property tests hold both sides to it), and tarfile does the rest.
"""

from __future__ import annotations

import functools
import os
import re
import tarfile
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import IO, BinaryIO, NamedTuple, Protocol, cast
from zlib import adler32

__all__ = [
    "XATTR_PREFIX",
    "Header",
    "TarReader",
    "member_header",
    "member_problem",
    "pax_block",
    "pax_time",
    "pax_time_ns",
]

BLOCK = tarfile.BLOCKSIZE
_NS = 1_000_000_000
_PIECE = 1 << 20  # bytes asked of the stream at a time

# ---------------------------------------------------------------- writing


_USTAR_TAIL = b"ustar\x0000" + bytes(32 + 32 + 8 + 8 + 155 + 12)  # magic, owners, dev, prefix, pad
_FAST_TYPES = (tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE)
_PAX_NAME = b"././@PaxHeader"  # what tarfile writes (star's convention)
_OCTAL_7 = 0o7777777
_OCTAL_11 = 0o77777777777
XATTR_PREFIX = "SCHILY.xattr."
# The part of a block after its checksum when it has no link name, and what it adds to the
# checksum (with the checksum field itself, counted as eight spaces).
_TAILS = {kind: kind + bytes(100) + _USTAR_TAIL for kind in (*_FAST_TYPES, tarfile.XHDTYPE)}
_TAIL_SUMS = {kind: 8 * 32 + sum(tail) for kind, tail in _TAILS.items()}


def _ustar_block(
    name: bytes, mode: int, uid: int, gid: int, size: int, mtime: int, kind: bytes, link: bytes
) -> bytes:
    """One ustar block with no prefix, owner names or device numbers; ``name`` and ``link``
    are ASCII of at most 100 bytes.

    The checksum (the sum of the block's bytes) comes from ``zlib.adler32``, whose low half
    is one plus that sum modulo 65,521: such a block sums to less than 30,000, and adler32
    sums in C what ``sum()`` would walk byte by byte. The tail of a block without a link name
    is a constant, and so is its share of the checksum."""
    head = b"%s%07o\0%07o\0%07o\0%011o\0%011o\0" % (
        name.ljust(100, b"\0"),
        mode & 0o7777,
        uid,
        gid,
        size,
        mtime,
    )
    if link:
        tail = kind + link.ljust(100, b"\0") + _USTAR_TAIL
        checksum = (adler32(tail, adler32(head)) & 0xFFFF) - 1 + 8 * 32
    else:
        tail = _TAILS[kind]
        checksum = (adler32(head) & 0xFFFF) - 1 + _TAIL_SUMS[kind]
    return b"%s%06o\0 %s" % (head, checksum, tail)


@functools.lru_cache(maxsize=1024)
def pax_block(size: int) -> bytes:
    """The ``x`` block announcing an extended header of ``size`` bytes, as tarfile writes it
    (the extractor recognises ours by comparing with it)."""
    return _ustar_block(_PAX_NAME, 0, 0, 0, size, 0, tarfile.XHDTYPE, b"")


def _pax_record(keyword: bytes, value: bytes) -> bytes:
    """``"%d %s=%s\\n"`` whose length counts its own digits (tarfile's loop, exactly)."""
    length = len(keyword) + len(value) + 3
    n = p = 0
    while True:
        n = length + len(str(p))
        if n == p:
            break
        p = n
    return b"%d %s=%s\n" % (p, keyword, value)


def _pax_header(pax: Mapping[str, str]) -> bytes:
    """The extended header (``x`` block and records) that tarfile writes for ``pax``.

    A value holding surrogate escapes (bytes that are not UTF-8, e.g. a binary xattr) makes
    the whole header ``hdrcharset=BINARY`` with the raw bytes, as tarfile does (POSIX's way
    to say the values are not UTF-8; GNU tar ignores the record and keeps the raw bytes).
    """
    binary = False
    for value in pax.values():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            binary = True
            break
    records = [b"21 hdrcharset=BINARY\n"] if binary else []
    for keyword, value in pax.items():
        raw = value.encode("utf-8", "surrogateescape") if binary else value.encode("utf-8")
        records.append(_pax_record(keyword.encode("utf-8"), raw))
    payload = b"".join(records)
    return pax_block(len(payload)) + payload + bytes(-len(payload) % BLOCK)


def pax_time(ns: int) -> str:
    """A PAX time value for ``ns`` nanoseconds: ``1700000000.123456789``, trailing zeros
    dropped (as GNU tar writes it)."""
    sign = "-" if ns < 0 else ""
    seconds, fraction = divmod(abs(ns), _NS)
    if not fraction:
        return f"{sign}{seconds}"
    return f"{sign}{seconds}.{fraction:09d}".rstrip("0")


# The extended header of a member whose only record is its sub-second mtime (the common
# case: ext4, XFS and btrfs keep nanoseconds), by the length of the value: its ``x`` block
# and record prefix, and the record's end with the padding to a block.
_MTIME_PARTS: dict[int, tuple[bytes, bytes]] = {}


def _mtime_parts(length: int) -> tuple[bytes, bytes]:
    value = b"1" * length
    record = _pax_record(b"mtime", value)
    prefix = record[: record.index(b"=") + 1]
    parts = _MTIME_PARTS[length] = (
        pax_block(len(record)) + prefix,
        b"\n" + bytes(-len(record) % BLOCK),
    )
    return parts


def member_header(
    name: str,
    kind: bytes,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime_ns: int,
    linkname: str = "",
    xattrs: Mapping[str, str] | None = None,
) -> bytes:
    """The header of one member: byte for byte what tarfile's ``tobuf(PAX_FORMAT)`` writes
    for a TarInfo with these fields, ``mtime = mtime_ns // 10**9``, empty owner names and
    ``pax_headers`` holding ``mtime`` (``pax_time``) when it has a fraction of a second,
    then ``xattrs`` (``SCHILY.xattr.NAME`` keys).

    Most entries fit a plain ustar block (ASCII names up to 100 bytes, numbers within the
    octal fields), preceded by an extended header for a sub-second mtime or xattrs: both
    are built directly, several times faster than tarfile's generic path, which costs
    about a second per 35,000 files. The extended header of a sub-second mtime alone is
    one formatting of the time between two cached pieces. Anything else (long or
    non-ASCII names, huge numbers, times before 1970) goes through tarfile.
    """
    if kind == tarfile.DIRTYPE and not name.endswith("/"):
        name += "/"
    mtime, fraction = divmod(mtime_ns, _NS)
    if (
        len(name) <= 100
        and name.isascii()
        and 0 <= mtime < _OCTAL_11
        and 0 <= size < _OCTAL_11
        and 0 <= uid < _OCTAL_7
        and 0 <= gid < _OCTAL_7
        and kind in _FAST_TYPES
        and (not linkname or (len(linkname) <= 100 and linkname.isascii()))
    ):
        block = _ustar_block(
            name.encode("ascii"), mode, uid, gid, size, mtime, kind, linkname.encode("ascii")
        )
        if xattrs:
            pax = {"mtime": pax_time(mtime_ns)} if fraction else {}
            pax.update(xattrs)
            return _pax_header(pax) + block
        if not fraction:
            return block
        value = (b"%d.%09d" % (mtime, fraction)).rstrip(b"0")
        parts = _MTIME_PARTS.get(len(value)) or _mtime_parts(len(value))
        return b"".join((parts[0], value, parts[1], block))
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode, info.uid, info.gid, info.size, info.mtime = mode, uid, gid, size, mtime
    info.linkname = linkname
    info.uname = info.gname = ""  # numeric owners only
    records = {"mtime": pax_time(mtime_ns)} if fraction else {}
    if xattrs:
        records.update(xattrs)
    info.pax_headers = records
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


# ---------------------------------------------------------------- reading

# The numbers a member may have: anything else is refused (see member_problem).
_MAX_ID = 2**32 - 2  # uid_t/gid_t: 2**32 - 1 is (uid_t) -1, "leave the owner unchanged"
_MAX_SIZE = 2**62  # bytes: past the end of any archive, and its offset still fits off_t
_TIME_T = 2**63  # seconds: a time is within (-2**63, 2**63)
_PAX_TIME_RE = re.compile(r"(-?)([0-9]{1,30})(?:\.([0-9]*))?", re.ASCII)
_PAX_INT_KEYS = ("uid", "gid", "size")


def pax_time_ns(text: str) -> int | None:
    """A PAX time (``1700000000.123456789``, ``-1.5``) in exact nanoseconds; None when it is
    not one (``1e300``, ``nan``).

    tarfile turns it into a float, which keeps only about 0.2 microseconds of today's
    times; the string is read here digit for digit (digits past nanoseconds dropped).
    """
    match = _PAX_TIME_RE.fullmatch(text)
    if match is None:
        return None
    sign, seconds, fraction = match.groups()
    ns = int(seconds) * _NS + int((fraction or "")[:9].ljust(9, "0"))
    return -ns if sign else ns


def _shown(text: str) -> str:
    return repr(text) if len(text) <= 40 else repr(text[:40])[:-1] + "...'"


def member_problem(member: tarfile.TarInfo) -> str | None:
    """Why ``member``'s numbers are ones no file can have, or None: an owner outside
    ``uid_t``/``gid_t`` (or ``-1``), a negative size, an mtime that is not a finite time a
    ``time_t`` holds, or a PAX record of those that is not a plain number (tarfile alone
    would read ``gid=1e20`` as 0, ``mtime=nan`` as a NaN). The one rule of every reader:
    the extractor refuses such a member, ``verify --deep`` calls the archive damaged."""
    pax = member.pax_headers
    if pax:
        for key in _PAX_INT_KEYS:
            text = pax.get(key)
            if text is not None and not (text.isascii() and text.isdigit()):
                return f"has {key} {_shown(text)}, not a number a file can have"
        text = pax.get("mtime")
        if text is not None:
            ns = pax_time_ns(text)
            if ns is None or not -_TIME_T * _NS < ns < _TIME_T * _NS:
                return f"has mtime {_shown(text)}, not a time a file can have"
    for key, value in (("uid", member.uid), ("gid", member.gid)):
        if not 0 <= value <= _MAX_ID:
            return f"has {key} {value}, not an owner a file can have"
    if member.size < 0:
        return f"has size {member.size}, a negative size"
    if not -_TIME_T < member.mtime < _TIME_T:  # False for NaN too
        return f"has mtime {member.mtime}, not a time a file can have"
    return None


class _Input:
    """The stream read in large pieces, members sliced out of them: one ``read`` of the
    stream per many small members instead of several Python-level reads each.

    It is also the file tarfile reads the headers of other writers from (``read``, ``tell``
    and forward ``seek`` only): ``tarfile`` runs in its plain ``r:`` mode over it, the
    offsets of both parsers are the same. The bytes from one block before the last place
    asked for are kept (tarfile reads back one byte to check that a member's data is
    there); a backward seek further than that raises ``StreamError``, as ``r|`` would.

    ``tarfile`` silently stops at a truncated or corrupt header after the first member; the
    only proof that a stream is complete is the zero block where the next header would be
    (``is_zero_block_at``).
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self.buf = b""
        self.view = memoryview(self.buf)  # of buf: members' data sliced without a copy
        self.base = 0  # the archive offset of buf[0]
        self.pos = 0  # tarfile's position
        self._eof = False

    def fill(self, offset: int, size: int) -> int:
        """Make ``buf`` hold the archive's bytes ``[offset, offset + size)`` (fewer at the
        end of the stream) and return where ``offset`` is in it (``offset >= base``)."""
        buf = self.buf
        index = offset - self.base
        if index + size <= len(buf) or self._eof:
            return index
        if index > len(buf):  # skipped data, read through (but the block before offset)
            self.base += len(buf)
            buf = self.buf = b""
            self.view = memoryview(buf)
            stop = offset - BLOCK
            while self.base < stop:
                piece = self._stream.read(min(stop - self.base, _PIECE))
                if not piece:
                    self._eof = True
                    return offset - self.base
                self.base += len(piece)
            index = offset - self.base
        keep = index - BLOCK if index > BLOCK else 0
        parts = [buf[keep:]] if keep else [buf]
        have = len(buf) - keep
        need = index - keep + size
        while have < need:
            piece = self._stream.read(max(_PIECE, need - have))
            if not piece:
                self._eof = True
                break
            parts.append(piece)
            have += len(piece)
        self.buf = b"".join(parts) if len(parts) > 1 else parts[0]
        self.view = memoryview(self.buf)
        self.base += keep
        return index - keep

    def take(self, offset: int, size: int) -> bytes:
        """The archive's bytes ``[offset, offset + size)``, fewer at the end of the stream."""
        index = self.fill(offset, size)
        return self.buf[index : index + size]

    def exact(self, offset: int, size: int) -> memoryview:
        """A member's data: ``take`` as a view of the piece read (no copy; valid for good:
        pieces are immutable), all ``size`` bytes or ``ReadError`` (the stream ended)."""
        index = self.fill(offset, size)
        data = self.view[index : index + size]
        if len(data) != size:
            raise tarfile.ReadError("unexpected end of data")
        return data

    # The file tarfile reads.

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_CUR:
            offset += self.pos
        elif whence != os.SEEK_SET:
            raise tarfile.StreamError("seeking from the end is not possible in a stream")
        if offset < self.base:
            raise tarfile.StreamError("seeking backwards is not allowed")
        self.pos = offset
        return offset

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            parts = []
            while piece := self.read(_PIECE):
                parts.append(piece)
            return b"".join(parts)
        data = self.take(self.pos, size)
        self.pos += len(data)
        return data

    def is_zero_block_at(self, offset: int) -> bool:
        if offset < self.base:
            return False
        block = self.take(offset, BLOCK)
        return len(block) == BLOCK and not block.strip(b"\0")


class _MemberData:
    """Reads one member's ``size`` bytes at ``offset`` of the archive: views of the pieces
    read (no copy; each valid for good, the pieces are immutable)."""

    def __init__(self, source: _Input, offset: int, size: int) -> None:
        self._source, self._position, self._remaining = source, offset, size

    def read(self, size: int = -1) -> bytes | memoryview:
        if size < 0 or size > self._remaining:
            size = self._remaining
        if size <= 0:
            return b""
        data = self._source.exact(self._position, size)
        self._position += size
        self._remaining -= size
        return data


_XHD = tarfile.XHDTYPE[0]  # a PAX extended header's type, as the int buf[i] gives
_REGTYPE, _DIRTYPE = tarfile.REGTYPE, tarfile.DIRTYPE
_FAST_KINDS = frozenset((tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE))
_FAST_PAX_KEYS = frozenset(("mtime", "atime", "ctime", "path", "linkpath", "hdrcharset"))
_PAX_LENGTH_RE = re.compile(rb"[1-9][0-9]{0,8} ")
_USTAR_MAGIC = b"ustar\x0000"  # POSIX ustar/pax (GNU's "ustar  \0" is tarfile's job)
# The most header bytes parsed here: an extended header of up to 7 blocks, then the member's.
FAST_HEADER_BYTES = 9 * BLOCK
# An extended header whose one record is an mtime that the short cut takes (below).
_MTIME_RECORD = re.compile(rb"([1-9][0-9]) mtime=(-?[0-9]{1,18}(?:\.[0-9]*)?)\n")
# A PAX mtime the short cut takes: a plain number within time_t (no member_problem then:
# its other numbers are fixed-width octal, always in range).
_FAST_TIME_RE = re.compile(r"-?[0-9]{1,18}(?:\.[0-9]*)?", re.ASCII)


def _name(field: bytes) -> str:
    """tarfile's nts(): up to the first NUL, UTF-8 with surrogate escapes."""
    end = field.find(b"\0")
    return (field if end < 0 else field[:end]).decode("utf-8", "surrogateescape")


def _number(field: bytes) -> int:
    """tarfile's nti() for plain octal fields; ValueError for base-256 or garbage."""
    if field[:1] in (b"\x80", b"\xff"):
        raise ValueError("base-256 number")
    end = field.find(b"\0")
    return int((field if end < 0 else field[:end]).strip() or b"0", 8)


# A ustar block as the writer lays it out: name, the six fixed-width octal fields (mode,
# uid, gid, size, mtime, checksum), a regular file, hard link, symlink or directory, link
# name, POSIX magic, and nothing after it (no owner names, device numbers or prefix).
_OUR_BLOCK = re.compile(
    rb"(.{100})([0-7]{7})\0([0-7]{7})\0([0-7]{7})\0([0-7]{11})\0([0-7]{11})\0([0-7]{6})\0 "
    rb"([0125])(.{100})ustar\x0000\0{247}",
    re.DOTALL,
)
_EMPTY_TAIL = bytes(BLOCK - 265)  # no owner names, device numbers or prefix


def _parse_ustar(raw: bytes, offset: int) -> tarfile.TarInfo:
    """The TarInfo tarfile's ``frombuf`` makes of a valid POSIX ustar block (ValueError
    when it is not one: bad checksum, odd magic or numbers)."""
    if raw[257:265] != _USTAR_MAGIC:
        raise ValueError("not a POSIX ustar header")
    if _number(raw[148:156]) != 256 + sum(raw[:148]) + sum(raw[156:]):
        raise ValueError("bad checksum (or a signed one)")
    info = tarfile.TarInfo(_name(raw[:100]))
    info.mode = _number(raw[100:108])
    info.uid = _number(raw[108:116])
    info.gid = _number(raw[116:124])
    info.size = _number(raw[124:136])
    info.mtime = _number(raw[136:148])
    info.chksum = _number(raw[148:156])
    info.type = raw[156:157]
    info.linkname = _name(raw[157:257])
    info.uname = _name(raw[265:297])
    info.gname = _name(raw[297:329])
    info.devmajor = _number(raw[329:337])
    info.devminor = _number(raw[337:345])
    prefix = _name(raw[345:500])
    if info.type == tarfile.DIRTYPE:
        info.name = info.name.rstrip("/")
    if prefix:
        info.name = prefix + "/" + info.name
    info.offset = offset
    return info


def _pax_records(payload: bytes) -> dict[str, str]:
    """Well-formed records of the keys written here, decoded as tarfile decodes them
    (ValueError for anything else: other keys are left to tarfile)."""
    # tarfile first looks for "hdrcharset=" anywhere in the payload (inside a value too):
    # only the record this tool writes, first, gives the same answer here.
    if b"hdrcharset=" in payload and not payload.startswith(b"21 hdrcharset=BINARY\n"):
        raise ValueError("hdrcharset is left to tarfile")
    records: dict[str, str] = {}
    pos = 0
    while pos < len(payload):
        match = _PAX_LENGTH_RE.match(payload, pos)
        if match is None:
            raise ValueError("not a record")
        length = int(match[0])
        end = pos + length
        equals = payload.find(b"=", match.end(), end)
        if equals < 0 or end > len(payload) or payload[end - 1 : end] != b"\n":
            raise ValueError("malformed record")
        keyword = payload[match.end() : equals].decode("utf-8", "surrogateescape")
        if keyword not in _FAST_PAX_KEYS and not keyword.startswith(XATTR_PREFIX):
            raise ValueError(f"record {keyword!r} is left to tarfile")
        records[keyword] = payload[equals + 1 : end - 1].decode("utf-8", "surrogateescape")
        pos = end
    if records.get("hdrcharset", "BINARY") != "BINARY":
        raise ValueError("unknown hdrcharset")
    return records


class Header(NamedTuple):
    """One member, as the extractor reads it: parsed here from this tool's own headers
    (no ``tarfile.TarInfo`` built), or taken from tarfile's TarInfo (``info``) for any
    other. ``mtime`` is the ustar field's seconds, or tarfile's reading of a PAX mtime;
    the exact time is ``pax["mtime"]`` when there is one (``pax_time_ns``)."""

    name: str
    type: bytes
    size: int
    offset_data: int
    mode: int
    uid: int
    gid: int
    mtime: float
    linkname: str
    pax: Mapping[str, str] | None  # the member's extended records (None: none)
    offset: int
    chksum: int
    info: tarfile.TarInfo | None = None

    @classmethod
    def of(cls, info: tarfile.TarInfo) -> Header:
        return cls(
            info.name,
            info.type,
            info.size,
            info.offset_data,
            info.mode,
            info.uid,
            info.gid,
            info.mtime,
            info.linkname,
            info.pax_headers or None,
            info.offset,
            info.chksum,
            info,
        )

    def tarinfo(self) -> tarfile.TarInfo:
        """The TarInfo tarfile makes of the same bytes."""
        if self.info is not None:
            return self.info
        info = tarfile.TarInfo(self.name)
        info.type, info.mode, info.uid, info.gid = self.type, self.mode, self.uid, self.gid
        info.size, info.mtime, info.chksum = self.size, self.mtime, self.chksum
        info.linkname = self.linkname
        info.uname = info.gname = ""
        info.devmajor = info.devminor = 0
        if self.pax is not None:
            info.pax_headers = self.pax
            if "mtime" in self.pax:
                info.mtime = float(self.pax["mtime"])
        info.offset, info.offset_data = self.offset, self.offset_data
        return info

    def isreg(self) -> bool:
        return self.type in tarfile.REGULAR_TYPES

    def isdir(self) -> bool:
        return self.type == tarfile.DIRTYPE

    def issym(self) -> bool:
        return self.type == tarfile.SYMTYPE

    def islnk(self) -> bool:
        return self.type == tarfile.LNKTYPE

    def ischr(self) -> bool:
        return self.type == tarfile.CHRTYPE

    def isblk(self) -> bool:
        return self.type == tarfile.BLKTYPE

    def isfifo(self) -> bool:
        return self.type == tarfile.FIFOTYPE


# Long: once per member on the extractor's hot path (a split costs ~0.3 us per member).
def _fast_header(buf: bytes, start: int, offset: int) -> tuple[Header, int] | None:
    """The member whose headers start at ``buf[start]`` (archive ``offset``) and the offset
    of the next header, for what this tool writes: a POSIX ustar block of a regular file,
    directory, symlink or hard link, optionally after an extended header of mtime, atime,
    ctime, path, linkpath, hdrcharset and SCHILY.xattr.* records. Its fields are the ones
    tarfile (3.11+) reads from the same bytes (``Header.tarinfo``), in a fraction of the
    time; None for any other header, or when ``buf`` ends too soon: tarfile then parses
    (or refuses) it.
    """
    available = len(buf) - start
    if available < BLOCK:
        return None
    try:
        records = None
        if buf[start + 156] == _XHD:
            size = _number(buf[start + 124 : start + 136])
            if buf[start : start + BLOCK] != pax_block(size):
                # another writer's: validated as tarfile would
                _parse_ustar(buf[start : start + BLOCK], offset)
            skip = BLOCK + -(-size // BLOCK) * BLOCK
            padding = skip - BLOCK - size
            if available < skip + BLOCK or buf[start + skip - padding : start + skip] != bytes(
                padding
            ):
                return None
            payload = buf[start + BLOCK : start + BLOCK + size]
            record = _MTIME_RECORD.fullmatch(payload)
            if record is not None and int(record[1]) == size:  # the usual one: mtime alone
                records = {"mtime": record[2].decode("ascii")}
            else:
                records = _pax_records(payload)
            start += skip
            offset_data = offset + skip + BLOCK
        else:
            offset_data = offset + BLOCK
        if available < offset_data - offset:
            return None
        block = _OUR_BLOCK.match(buf, start)
        if block is not None:
            field, mode, uid, gid, size_field, mtime_field, checksum_field, kind, link = (
                block.groups()
            )
            checksum = int(checksum_field, 8)
            # The sum of the block's bytes (the checksum field counted as spaces, the zeros
            # after byte 265 adding nothing), each half by adler32, whose low 16 bits are
            # one plus the sum of the bytes while that stays below 65,521: at most 148 * 255
            # and 109 * 255 here (as the writer computes it).
            if checksum != 254 + (adler32(buf[start : start + 148]) & 0xFFFF) + (
                adler32(buf[start + 156 : start + 265]) & 0xFFFF
            ):
                return None
            end = field.find(b"\0")
            name = (field if end < 0 else field[:end]).decode("utf-8", "surrogateescape")
            if kind == _DIRTYPE:
                name = name.rstrip("/")
            if link[0]:  # a link's target (a file's is empty)
                end = link.find(b"\0")
                linkname = (link if end < 0 else link[:end]).decode("utf-8", "surrogateescape")
            else:
                linkname = ""
            mtime: float = int(mtime_field, 8)
            info = None
        else:
            kind = buf[start + 156 : start + 157]
            if kind not in _FAST_KINDS:
                return None
            info = _parse_ustar(buf[start : start + BLOCK], offset)
            name, linkname, mtime, checksum = info.name, info.linkname, info.mtime, info.chksum
        if records:
            if "path" in records:
                name = records["path"].rstrip("/")
            if "linkpath" in records:
                linkname = records["linkpath"]
            if "mtime" in records and _FAST_TIME_RE.fullmatch(records["mtime"]) is None:
                return None  # tarfile's, and judged there (member_problem)
        else:
            records = None
        if info is None:  # our block: its numbers parsed here
            header = Header(
                name,
                kind,
                int(size_field, 8),
                offset_data,
                int(mode, 8),
                int(uid, 8),
                int(gid, 8),
                mtime,
                linkname,
                records,
                offset,
                checksum,
            )
        else:
            info.name, info.linkname, info.offset_data = name, linkname, offset_data
            if records is not None:
                info.pax_headers = records
                if "mtime" in records:
                    info.mtime = float(records["mtime"])
            header = Header.of(info)
    except ValueError:
        return None
    padded = -(-header.size // BLOCK) * BLOCK if kind == _REGTYPE else 0
    return header, offset_data + padded


#: The fast parser, for a decompression child that parses ahead (``stream.hints``).
fast_header = _fast_header


def _fast_member(data: bytes, offset: int) -> tuple[tarfile.TarInfo, int] | None:
    """``_fast_header`` of ``data``'s first member as a TarInfo (what tarfile would make of
    it) and the offset of the next header."""
    parsed = _fast_header(data, 0, offset)
    if parsed is None:
        return None
    header, following = parsed
    return header.tarinfo(), following


class Hints(Protocol):
    """Headers parsed ahead of the reader (``stream.hints.HeaderHints``)."""

    def take(self, offset: int) -> tuple[Header, int] | None: ...


class TarReader:
    """The members of an uncompressed tar stream, read forward in one pass.

    The stream is read in large pieces (``_Input``); the headers this tool writes are
    parsed here from them (``headers()`` gives them as ``Header`` tuples, no TarInfo
    built), anything else by tarfile in its plain ``r:`` mode from the same offset. The
    stream must end with an end-of-archive block where the next header would be, or
    ``tarfile.ReadError`` is raised when the members are exhausted (tarfile alone stops
    silently at a truncated or corrupt header). Member data is read with ``data(member)``
    before the next member is asked for, or skipped.

    Every member's numbers are judged here (``member_problem``): one whose numbers no file
    can have is handed to ``refuse`` (member, reason) and skipped; without ``refuse`` it
    raises ``tarfile.ReadError`` (the archive is damaged). A size past the end of any
    archive raises ``tarfile.ReadError`` either way: no member after it can be found.
    """

    def __init__(
        self,
        stream: BinaryIO,
        *,
        refuse: Callable[[tarfile.TarInfo, str], None] | None = None,
        hints: Hints | None = None,
    ) -> None:
        self._refuse = refuse
        self._hints = hints
        self._input = _Input(stream)
        self._archive = tarfile.open(
            fileobj=cast(BinaryIO, self._input),  # read(), tell() and forward seek() only
            mode="r:",
            encoding="utf-8",
            errors="surrogateescape",
        )

    def __enter__(self) -> TarReader:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._archive.close()

    def __iter__(self) -> Iterator[tarfile.TarInfo]:
        for header in self.headers():
            yield header.tarinfo()

    def headers(self) -> Iterator[Header]:
        """Every member, in order (the extractor's hot path: see ``_fast_header``)."""
        archive = self._archive
        source = self._input
        hints = self._hints
        member = self._judged_next()
        if member is not None:
            archive.members.clear()  # type: ignore[attr-defined]
            yield Header.of(member)
            while True:
                if not archive.pax_headers:  # a global header applies to every member
                    offset = archive.offset
                    hinted = hints.take(offset) if hints is not None else None
                    if hinted is not None:  # parsed ahead by the decompression child
                        header, archive.offset = hinted
                        yield header
                        continue
                    start = offset - source.base
                    if start + FAST_HEADER_BYTES > len(source.buf):
                        start = source.fill(offset, FAST_HEADER_BYTES)
                    parsed = _fast_header(source.buf, start, offset)
                    if parsed is not None:
                        header, archive.offset = parsed
                        yield header
                        continue
                member = self._judged_next()
                if member is None:
                    break
                # tarfile keeps every member it reads; drop them to stay flat.
                archive.members.clear()  # type: ignore[attr-defined]
                yield Header.of(member)
        if not source.is_zero_block_at(archive.offset):
            raise tarfile.ReadError(
                f"no valid header or end-of-archive marker at offset {archive.offset}"
            )

    def _judged_next(self) -> tarfile.TarInfo | None:
        """tarfile's next member whose numbers are fine (see the class docstring)."""
        archive = self._archive
        while True:
            member = archive.next()
            if member is None:
                return None
            if member.size > _MAX_SIZE:
                raise tarfile.ReadError(
                    f"member {member.name!r} has size {member.size}, past the end of any archive"
                )
            problem = member_problem(member)
            if problem is None:
                return member
            archive.members.clear()  # type: ignore[attr-defined]
            if member.size < 0:  # tarfile would seek back by it: the next header follows
                archive.offset = member.offset_data
            if self._refuse is None:
                raise tarfile.ReadError(f"member {member.name!r} {problem}")
            self._refuse(member, problem)

    def data(self, member: Header | tarfile.TarInfo) -> IO[bytes] | None:
        """A regular member's data, sliced from the pieces read (sparse ones via tarfile)."""
        info = member if isinstance(member, tarfile.TarInfo) else member.info
        if info is not None and info.issparse():
            return self._archive.extractfile(info)
        return cast(IO[bytes], _MemberData(self._input, member.offset_data, member.size))

    def whole(self, member: Header) -> IO[bytes] | bytes | memoryview | None:
        """A small regular member's data as one piece (``data`` for a sparse one): a view
        of the piece read when it is there (no copy), bytes otherwise."""
        if member.info is not None and member.info.issparse():
            return self.data(member)
        source = self._input
        start = member.offset_data - source.base
        end = start + member.size
        if start >= 0 and end <= len(source.buf):  # the usual case: read already
            return source.view[start:end]
        return source.exact(member.offset_data, member.size)
