"""The codecs both ways: a compressor per ``CLOUDBACKUP_COMPRESSION`` for the writer, and a
decompressing reader for restore and ``verify --deep``."""

from __future__ import annotations

import bz2
import gzip
import lzma
import zlib
from collections.abc import Callable
from typing import Any, Protocol

import zstandard


class Compressor(Protocol):
    def compress(self, data: Any, /) -> bytes: ...

    def flush(self) -> bytes: ...


class _Identity:
    def compress(self, data: Any) -> bytes:
        return bytes(data)

    def flush(self) -> bytes:
        return b""


JOB_SIZE = 2 * 1024 * 1024


class _Zstd:
    """zstd through a stream writer: output goes to ``emit`` in 1 MiB pieces as it is
    produced (a compressobj would hand back multi-MiB chunks and hold more memory)."""

    class _Out:
        def __init__(self, emit: Callable[[bytes], None]) -> None:
            self.emit = emit

        def write(self, data: Any) -> int:
            self.emit(bytes(data))
            return len(data)

    def __init__(self, level: int, emit: Callable[[bytes], None]) -> None:
        # threads=-1: one worker per core; compression overlaps with our reading. Jobs of
        # JOB_SIZE: zstd's default at level 3 (four windows, 8 MiB) held ~110 MiB of input
        # and output buffers on two cores; 2 MiB jobs hold ~35 MiB, compress as fast and
        # cost 0.04 % of the output size (benchmarks/README.md, "Memory").
        params = zstandard.ZstdCompressionParameters.from_level(
            level, threads=-1, job_size=JOB_SIZE, write_checksum=1
        )
        cctx = zstandard.ZstdCompressor(compression_params=params)
        self._writer = cctx.stream_writer(
            self._Out(emit),  # type: ignore[arg-type]
            write_size=1024 * 1024,
            closefd=False,
        )

    def compress(self, data: Any) -> bytes:
        self._writer.write(data)
        return b""

    def flush(self) -> bytes:
        self._writer.flush(zstandard.FLUSH_FRAME)
        return b""


def make_compressor(
    compression: str, level: int | None, emit: Callable[[bytes], None] | None = None
) -> Compressor:
    if compression == "zstd":
        if emit is None:
            raise ValueError("zstd needs an output callback")
        return _Zstd(level or 3, emit)
    if compression == "gzip":
        return zlib.compressobj(level or 6, zlib.DEFLATED, 31)  # 31: gzip container
    if compression == "xz":
        return lzma.LZMACompressor(preset=6 if level is None else level)
    if compression == "bzip2":
        return bz2.BZ2Compressor(level or 9)
    if compression == "none":
        return _Identity()
    raise ValueError(f"unknown compression {compression!r}")


def open_decompressed(stream: Any, compression: str) -> Any:
    """A readable stream of the tar bytes inside a compressed archive stream."""
    if compression == "zstd":
        return zstandard.ZstdDecompressor().stream_reader(
            stream, read_size=1024 * 1024, read_across_frames=True
        )  # type: ignore[return-value]
    if compression == "gzip":
        return gzip.GzipFile(fileobj=stream, mode="rb")
    if compression == "xz":
        return lzma.LZMAFile(stream, "rb")
    if compression == "bzip2":
        return _Bz2Reader(stream, "rb")
    if compression == "none":
        return stream
    raise ValueError(f"unknown compression {compression!r}")


class CorruptStream(Exception):
    """A compressed stream that does not decompress, where its codec says so with an error
    of a general type."""


class _Bz2Reader(bz2.BZ2File):
    """``BZ2File`` reports corrupt data as a bare ``OSError`` ("Invalid data stream"), the
    type of a failed system call: here it is a ``CorruptStream`` (an OSError with an errno
    is still one)."""

    def read(self, size: int | None = -1) -> bytes:
        try:
            return super().read(-1 if size is None else size)
        except OSError as exc:
            raise _corrupt(exc) from None

    def readinto(self, b: Any) -> int:
        try:
            return super().readinto(b)
        except OSError as exc:
            raise _corrupt(exc) from None


def _corrupt(exc: OSError) -> BaseException:
    return CorruptStream(f"bzip2: {exc}") if exc.errno is None else exc


#: What a decompressor raises for a corrupt or truncated stream (an integrity failure).
DECOMPRESS_ERRORS: tuple[type[BaseException], ...] = (
    zstandard.ZstdError,
    lzma.LZMAError,
    zlib.error,
    gzip.BadGzipFile,
    EOFError,
    CorruptStream,
)


# ---------------------------------------------------------------- the decompression child

#: Bytes a decompression child reads from its input and writes to its output at a time.
CHILD_CHUNK = 1024 * 1024


def decompress_child(
    compression: str,
    source: int = 0,
    sink: int = 1,
    on_piece: Callable[[memoryview], None] | None = None,
) -> int:
    """The body of a decompression child process (``python -c``): the compressed stream on
    descriptor ``source``, the decompressed one to ``sink``. python-zstandard gives up the
    GIL once per call and waits for it back, which a tar parser busy with small members
    makes long, so for those a restore runs it in a process of its own, fed by pipes.
    ``on_piece`` sees each decompressed piece before it is written (it must not keep the
    view). Returns the exit status: 0, or 3 with one line on stderr for a
    corrupt or truncated stream (2 for an unknown codec, 1 for a closed pipe)."""
    import os
    import sys

    raw = open(source, "rb", buffering=0, closefd=False)  # noqa: SIM115 - closed below
    try:
        stream = open_decompressed(raw, compression)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    buffer = bytearray(CHILD_CHUNK)
    view = memoryview(buffer)
    try:
        while True:
            n = stream.readinto(view)
            if not n:
                break
            out = view[:n]
            if on_piece is not None:
                on_piece(out)
            while out:
                out = out[os.write(sink, out) :]
    except DECOMPRESS_ERRORS as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 3
    except BrokenPipeError:
        return 1
    finally:
        raw.close()
    return 0
