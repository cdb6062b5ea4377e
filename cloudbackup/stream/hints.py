"""Header hints: a decompression child parses the tar headers of what it decompresses and
hands them to the extracting process ahead of the data, so that the extracting thread,
which holds the GIL for every member, does not parse them itself.

The child runs the extractor's own fast parser (``tarformat._fast_header``) over the very
bytes it writes to its output; the extractor takes a hint only for the header at the
offset it is at, and parses any member without one itself (the hints may lag behind, and
the child stops hinting for good at the first header the fast parser leaves to tarfile).
Hints are advisory and neither side ever waits for the other on the hint pipe (the child
holds back what the pipe cannot take), so no order between the two pipes can stall either
side. Frames on the hint pipe: a 4-byte little-endian length, then a ``marshal`` of a list
of entries, each the fields of a ``Header`` (``info`` None) and the next header's offset.

Measured on the 2-core benchmark VM: see benchmarks/RESULTS.md, "Restore" (2026-12-03).
"""

from __future__ import annotations

import marshal
import os
from collections import deque
from typing import Any

from cloudbackup.stream.compress import decompress_child
from cloudbackup.stream.tarformat import FAST_HEADER_BYTES, Header, fast_header

#: A hint: every field of a Header (``info`` None), then the next header's offset.
_FIELDS = len(Header._fields)
_OFFSET = Header._fields.index("offset")
_LENGTH = 4


class HeaderScanner:
    """The child's side: fed the decompressed stream in pieces, returns the hints of the
    headers each piece completes; ``done`` once a header is not one for the fast parser (or
    the stream ended): no hint after it."""

    def __init__(self) -> None:
        self._buf = b""
        self._base = 0  # the archive offset of _buf[0]
        self._next = 0  # the offset of the next header
        self.done = False

    def feed(self, data: bytes | memoryview) -> list[tuple[Any, ...]]:
        """The hints of the headers ``data`` (the next piece; copied, not kept) completes."""
        if self.done:
            return []
        held = len(self._buf)
        skip = self._next - self._base  # bytes held or fed before the next header
        if skip >= held + len(data):  # all of it is member data: skipped
            self._base += held + len(data)
            self._buf = b""
            return []
        buf = self._buf[skip:] + data if skip < held else bytes(data[skip - held :])
        base = self._next
        entries: list[tuple[Any, ...]] = []
        pos = 0
        while len(buf) - pos >= FAST_HEADER_BYTES:
            parsed = fast_header(buf, pos, base + pos)
            if parsed is None or parsed[0].info is not None:
                self.done = True
                self._buf = b""
                return entries
            header, following = parsed
            entries.append((*header, following))
            pos = following - base
        self._next = base + pos
        if pos >= len(buf):
            self._base, self._buf = base + len(buf), b""
        else:
            self._base, self._buf = base + pos, buf[pos:]
        return entries


def frame(entries: list[tuple[Any, ...]]) -> bytes:
    """One frame of the hint pipe."""
    blob = marshal.dumps(entries)
    return len(blob).to_bytes(_LENGTH, "little") + blob


#: Hint bytes a child holds back while the hint pipe is full; past that it stops hinting.
HELD_BACK = 8 * 1024 * 1024


def hinting_child(compression: str, hints: int, source: int = 0, sink: int = 1) -> int:
    """The body of a decompression child (``compress.decompress_child``) that sends the
    hints of each piece through the descriptor ``hints`` before the piece itself. It never
    waits on that pipe — the extractor may be waiting for the data — so what the pipe cannot
    take is held back and sent with the next piece (up to HELD_BACK). Hints are advisory: a
    scanner that fails, a reader gone or too much held back only ends them (the pipe is
    closed then: the reader stops looking)."""
    scanner = HeaderScanner()
    held = bytearray()
    os.set_blocking(hints, False)
    pipe = [hints]  # emptied once closed

    def stop() -> None:
        scanner.done = True
        if pipe:
            os.close(pipe.pop())

    def on_piece(piece: memoryview) -> None:
        if not pipe:
            return
        if not scanner.done:
            try:
                entries = scanner.feed(piece)
            except Exception:  # noqa: BLE001 - advisory: the extractor parses what has none
                stop()
                return
            if entries:
                held.extend(frame(entries))
        try:
            while held:
                del held[: os.write(hints, held)]
        except BlockingIOError:
            if len(held) > HELD_BACK:
                stop()  # a frame cut short is never read: no harm
            return
        except BrokenPipeError:
            stop()
            return
        if scanner.done:
            stop()  # all sent, no more to come: the reader sees the end

    try:
        return decompress_child(compression, source, sink, on_piece)
    finally:
        if pipe:
            os.close(pipe.pop())


class HeaderHints:
    """The extractor's side: the read end of a child's hint pipe, read without waiting."""

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self._fd: int | None = fd
        self._pending = bytearray()
        self._entries: deque[tuple[Any, ...]] = deque()

    def take(self, offset: int) -> tuple[Header, int] | None:
        """The header at archive ``offset`` and the next one's offset, if the child has
        parsed it by now; None otherwise (the caller parses it)."""
        entries = self._entries
        while True:
            while entries:
                entry = entries[0]
                at = entry[_OFFSET]
                if at == offset:
                    entries.popleft()
                    return Header._make(entry[:_FIELDS]), entry[_FIELDS]
                if at > offset:
                    return None
                entries.popleft()  # a header the caller parsed itself meanwhile
            if not self._refill():
                return None

    def _refill(self) -> bool:
        fd = self._fd
        if fd is None:
            return False
        try:
            data = os.read(fd, 1 << 20)
        except BlockingIOError:
            return False
        if not data:  # the child hints no more
            self.close()
            return False
        pending = self._pending
        pending += data
        start = 0
        while len(pending) - start >= _LENGTH:
            size = int.from_bytes(pending[start : start + _LENGTH], "little")
            end = start + _LENGTH + size
            if end > len(pending):
                break
            self._entries.extend(marshal.loads(pending[start + _LENGTH : end]))
            start = end
        del pending[:start]
        return bool(self._entries)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
