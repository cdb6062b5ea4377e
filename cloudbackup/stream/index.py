"""The per-backup index of a tree source (SPEC "Incremental archives").

``<id>.index.zst``: zstd-compressed JSON Lines, one record per path of the whole tree at the
backup's instant, in walk order (depth-first, names sorted at each level): ``path`` (or
``path_b64`` for a name that is not UTF-8), ``type`` (``file``, ``dir``, ``symlink``),
``size``, ``mtime_ns``, ``ctime_ns``, ``ino``, ``mode``, ``uid``, ``gid``, ``link`` (a
symlink's target, else null), ``in`` (the id of the archive holding the path's current
bytes) and ``partial`` (true when the file could not be read completely).

The archive writer emits the records (:class:`IndexWriter`) while it writes the archive: one
pass, no second walk. The next backup reads its parent's index (:func:`read_index`, each
record validated) and compares it with the walk by a streaming merge-join in walk order
(:func:`mark_unchanged`): memory stays bounded whatever the tree's size. Chain restore reads
the final index the same way.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import zstandard

from cloudbackup.core.model import BackupId
from cloudbackup.fs.walk import FileEntry

#: git's "racy clean" rule: a path whose mtime is not older than the parent's walk start by
#: at least the timestamp granularity is archived again. Two seconds covers the coarsest
#: filesystems a tree lives on (FAT's 2 s, NFS and SMB servers rounding to the second).
RACY_NS = 2_000_000_000
_S_IFMT = 0o170000
_TYPES = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink"}
#: The largest record line read back (a path of 4,096 bytes is ~8 KiB in JSON).
MAX_LINE = 1 << 20
_MAX_INT = 2**63 - 1


def type_of(mode: int) -> str | None:
    return _TYPES.get(mode & _S_IFMT)


def sort_key(path: str) -> list[str]:
    """The walk's order: depth-first, names sorted at each level."""
    return path.split("/")


def _path_field(path: str) -> str:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return '"path_b64":"' + base64.b64encode(os.fsencode(path)).decode() + '"'
    return '"path":' + json.dumps(path)


@dataclass(slots=True)
class Record:
    """One index record, validated."""

    path: str
    type: str
    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    mode: int
    uid: int
    gid: int
    link: str | None
    within: str  # "in": the archive holding the path's current bytes
    partial: bool = False


class IndexWriter:
    """Records written as the archive is written, compressed into ``fd`` (hashed by the
    caller's sink through ``put``). Counts the whole tree for the manifest."""

    def __init__(self, put: Callable[[bytes], None], backup_id: str) -> None:
        self._put = put
        self._own = json.dumps(backup_id)
        self._compressor = zstandard.ZstdCompressor(level=3, write_checksum=True).compressobj()
        self._lines: list[str] = []
        self._pending = 0
        self.tree_files = 0
        self.tree_bytes = 0
        self.carried = 0  # paths not archived again (their record names an older archive)
        self.carried_bytes = 0

    def add(
        self,
        entry: FileEntry,
        link: str | None = None,
        partial: bool = False,
        within: str | None = None,
    ) -> None:
        """The record of ``entry``, archived in this backup (or, with ``within``, in that
        older one)."""
        st = entry.st
        kind = _TYPES.get(st.st_mode & _S_IFMT)
        if kind is None:
            return
        size = 0 if kind == "dir" else st.st_size
        if kind != "dir":
            self.tree_files += 1
            if kind == "file":
                self.tree_bytes += size
        line = (
            "{" + _path_field(entry.arcname)
            + f',"type":"{kind}","size":{size},"mtime_ns":{st.st_mtime_ns},'
            f'"ctime_ns":{st.st_ctime_ns},"ino":{st.st_ino},"mode":{st.st_mode},'
            f'"uid":{st.st_uid},"gid":{st.st_gid},"link":'
            + ("null" if link is None else json.dumps(link))
            + ',"in":'
            + (self._own if within is None else json.dumps(within))
            + (',"partial":true}\n' if partial else "}\n")
        )
        self._lines.append(line)
        self._pending += len(line)
        if self._pending >= 1 << 20:
            self._flush()

    def carry(self, entry: FileEntry, record: Record) -> None:
        """``entry`` unchanged since the parent: its record names the archive that holds it."""
        self.carried += 1
        if record.type == "file":
            self.carried_bytes += entry.st.st_size
        self.add(entry, record.link, False, record.within)

    def _flush(self) -> None:
        if self._lines:
            data = "".join(self._lines).encode("utf-8", "surrogateescape")
            self._lines.clear()
            self._pending = 0
            out = self._compressor.compress(data)
            if out:
                self._put(out)

    def finish(self) -> None:
        self._flush()
        self._put(self._compressor.flush())


class IndexInvalid(Exception):
    """A record that is not one cloudbackup writes (the message says what is wrong)."""


def _int(data: dict[str, Any], name: str) -> int:
    value = data.get(name)
    if type(value) is not int or not 0 <= value <= _MAX_INT:
        raise IndexInvalid(f"{name} is not a non-negative integer")
    return value


def _path_of(data: dict[str, Any]) -> str:
    path = data.get("path")
    if path is None:
        raw = data.get("path_b64")
        if not isinstance(raw, str):
            raise IndexInvalid("a record has no path")
        try:
            path = os.fsdecode(base64.b64decode(raw, validate=True))
        except (binascii.Error, ValueError):
            raise IndexInvalid("a record's path_b64 is not base64") from None
    if not isinstance(path, str):
        raise IndexInvalid(f"a record's path {path!r:.60} is not a string")
    return _checked(path)


def _checked(path: str) -> str:
    """``path`` when it is a relative member name: not empty, no NUL, no component that is
    empty (so neither a leading nor a trailing ``/``), ``.`` or ``..`` — found as ``//``,
    ``/./`` or ``/../`` in the path between slashes (three searches, not a list of parts)."""
    between = f"/{path}/"
    if "//" in between or "/./" in between or "/../" in between or "\0" in path:
        raise IndexInvalid(f"a record's path {path!r:.60} is not a relative member name")
    return path


_PATH_START = b'{"path":"'


def parse_path(line: bytes) -> str:
    """The validated path of one index line (what a chain restore's merge-join needs). A
    line as the writer makes it (``{"path":"...`` with no escape in the path) is read
    without a JSON parse; anything else goes through one."""
    if len(line) > MAX_LINE:
        raise IndexInvalid("a record is too long")
    if line.startswith(_PATH_START):
        end = line.find(b'"', len(_PATH_START))
        raw = line[len(_PATH_START) : end]
        if end > 0 and b"\\" not in raw and raw.isascii():
            path = raw.decode("ascii")
            if path.isprintable():  # JSON allows no raw control character in a string
                return _checked(path)
    return _path_of(_record_object(line))


def _record_object(line: bytes) -> dict[str, Any]:
    """One index line parsed as a JSON object (IndexInvalid otherwise)."""
    try:
        data = json.loads(line)
    except (ValueError, RecursionError):
        raise IndexInvalid("a record is not JSON") from None
    if not isinstance(data, dict):
        raise IndexInvalid("a record is not an object")
    return data


def parse_record(line: bytes, source: str, owners: dict[str, bool] | None = None) -> Record:
    """One line of an index, validated: nothing in it is trusted (a path is a relative
    member name, never absolute, never with ``..``; ``in`` a backup id of ``source``).
    ``owners`` remembers which ``in`` values were found valid (a chain has few)."""
    if len(line) > MAX_LINE:
        raise IndexInvalid("a record is too long")
    data = _record_object(line)
    path = _path_of(data)
    kind = data.get("type")
    if kind not in ("file", "dir", "symlink"):
        raise IndexInvalid(f"{path!r:.60} has type {kind!r:.20}")
    link = data.get("link")
    if link is not None and not isinstance(link, str):
        raise IndexInvalid(f"{path!r:.60} has a link that is not a string")
    within = data.get("in")
    known = owners.get(within) if owners is not None and isinstance(within, str) else None
    if known is None:
        try:
            owner = BackupId.parse(within) if isinstance(within, str) else None
        except ValueError:
            owner = None
        known = owner is not None and owner.source == source and str(owner) == within
        if owners is not None and isinstance(within, str) and len(owners) < 10_000:
            owners[within] = known
    if not known or not isinstance(within, str):
        raise IndexInvalid(f"{path!r:.60} is in {within!r:.60}, not a backup of {source}")
    partial = data.get("partial", False)
    if type(partial) is not bool:
        raise IndexInvalid(f"{path!r:.60} has partial {partial!r:.20}")
    return Record(
        path,
        kind,
        _int(data, "size"),
        _int(data, "mtime_ns"),
        _int(data, "ctime_ns"),
        _int(data, "ino"),
        _int(data, "mode"),
        _int(data, "uid"),
        _int(data, "gid"),
        link,
        within,
        partial,
    )


def _chunks(stream: IO[bytes]) -> Iterator[bytes]:
    """A compressed index's bytes, decompressed, in pieces of up to 1 MiB."""
    reader = zstandard.ZstdDecompressor().stream_reader(stream, read_across_frames=True)
    while True:
        try:
            chunk = reader.read(1 << 20)
        except zstandard.ZstdError as exc:
            raise IndexInvalid(f"it is not zstd data ({exc})") from None
        if not chunk:
            return
        yield chunk


def read_lines(stream: IO[bytes]) -> Iterator[bytes]:
    """The lines of a compressed index, streamed (a line longer than ``MAX_LINE``: invalid)."""
    rest = b""
    for chunk in _chunks(stream):
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        if len(rest) > MAX_LINE:
            raise IndexInvalid("a record is too long")
        yield from lines
    if rest:
        raise IndexInvalid("it ends in the middle of a record")


def lines_with(stream: IO[bytes], needle: bytes) -> Iterator[bytes]:
    """The lines of a compressed index that hold ``needle``, found by searching each
    decompressed chunk (the lines in between are never split out)."""
    rest = b""
    for chunk in _chunks(stream):
        buf = rest + chunk
        cut = buf.rfind(b"\n") + 1
        rest = buf[cut:]
        if len(rest) > MAX_LINE:
            raise IndexInvalid("a record is too long")
        pos = 0
        while (hit := buf.find(needle, pos, cut)) >= 0:
            start = buf.rfind(b"\n", 0, hit) + 1
            end = buf.find(b"\n", hit, cut)
            yield buf[start:end]
            pos = end + 1
    if rest:
        raise IndexInvalid("it ends in the middle of a record")


def check_complete(stream: IO[bytes]) -> None:
    """Decompress ``stream`` to its end (zstd's frame checksum and end are checked), or
    IndexInvalid: a damaged or truncated index."""
    frame = zstandard.ZstdDecompressor().decompressobj()
    try:
        while chunk := stream.read(1 << 16):  # output discarded: a few MiB at most
            if frame.eof:
                raise IndexInvalid("bytes follow its end")
            frame.decompress(chunk)
    except zstandard.ZstdError as exc:
        raise IndexInvalid(f"it does not decompress ({exc})") from None
    if not frame.eof:
        raise IndexInvalid("it is truncated")


def read_index(stream: IO[bytes], source: str) -> Iterator[Record]:
    """Every record of an index, validated, in order; IndexInvalid at the first bad one."""
    owners: dict[str, bool] = {}
    for line in read_lines(stream):
        if line:
            yield parse_record(line, source, owners)


@dataclass
class Parent:
    """What change detection compares with: the parent's id and walk start, its records."""

    id: str
    base: str
    started_ns: int
    records: Iterator[Record]
    ignore_inode: bool = False


def unchanged(record: Record, st: os.stat_result, kind: str, parent: Parent) -> bool:
    """The SPEC's rule: same type, size, mtime_ns, ctime_ns, ino, mode, uid, gid; read
    completely last time; and an mtime older than the parent's walk start by at least the
    timestamp granularity (git's "racy clean" rule)."""
    return (
        record.type == kind
        and not record.partial
        and record.size == st.st_size
        and record.mtime_ns == st.st_mtime_ns
        and record.ctime_ns == st.st_ctime_ns
        and (parent.ignore_inode or record.ino == st.st_ino)
        and record.mode == st.st_mode
        and record.uid == st.st_uid
        and record.gid == st.st_gid
        and st.st_mtime_ns < parent.started_ns - RACY_NS
    )


def in_chain(within: str, parent: Parent, cache: dict[str, bool]) -> bool:
    """``within`` names a backup of the parent's chain (its base up to the parent)."""
    known = cache.get(within)
    if known is None:
        own = BackupId.parse(within)
        known = BackupId.parse(parent.base) <= own <= BackupId.parse(parent.id)
        cache[within] = known
    return known


def mark_unchanged(
    entries: Iterable[FileEntry],
    parent: Parent,
    on_invalid: Callable[[str], None],
) -> Iterator[FileEntry]:
    """Each entry, with ``carry`` set to the parent's record when the path is unchanged
    (the writer then indexes it without archiving it again): a streaming merge-join of the
    walk and the parent's index, both in walk order. Directories are always archived. A bad
    parent record ends the join (``on_invalid`` says why): every path after it is archived,
    never skipped."""
    records = parent.records
    current: Record | None = None
    current_key: list[str] = []
    done = False
    chain: dict[str, bool] = {}

    def advance() -> None:
        nonlocal current, current_key, done
        try:
            current = next(records)
            current_key = current.path.split("/")
        except StopIteration:
            current, done = None, True
        except IndexInvalid as exc:
            current, done = None, True
            on_invalid(str(exc))

    advance()
    for entry in entries:
        kind = _TYPES.get(entry.st.st_mode & _S_IFMT)
        if not done and kind is not None and kind != "dir":
            key = entry.arcname.split("/")
            while not done and current_key < key:
                advance()
            if (
                current is not None
                and current_key == key
                and unchanged(current, entry.st, kind, parent)
                and in_chain(current.within, parent, chain)
            ):
                entry.carry = current
        yield entry
