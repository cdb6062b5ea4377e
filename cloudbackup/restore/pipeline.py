"""The restore pipeline: an archive read once, from the store or the local dir, and handed
to the tar consumer through an explicit list of stages, all running at once.

::

    fetch (thread: read ─▶ SHA-256 + size) ─▶ stage ─▶ stage ... ─▶ tar stream (main thread)

* :class:`Fetch` reads the object in 1 MiB pieces on its own thread, hashes and counts them
  (hashlib and socket/file reads release the GIL) and hands them on through a bounded queue
  (flat memory). It never reads past the size the manifest names, and checks the size and
  the digest once the object is exhausted: :meth:`Pipeline.finish`.
* A stage turns one byte stream into another. :class:`ProcessStage` runs a child process
  fed by pipes (decompression of small members: python-zstandard gives up the GIL once per
  call, and a thread beside a parser busy with Python waits for it back at every call;
  age decryption, whose pyrage holds the GIL throughout); :class:`ThreadStage` runs a codec
  that releases the GIL on a thread of its own (decompression of large members, where the
  consumer mostly waits in the kernel's writes); :class:`InlineStage` wraps the stream on
  the consumer's thread (one core).
* The consumer (the extractor) reads the last stream on the main thread; once it is done,
  :meth:`Pipeline.finish` drains what is left, waits for every stage and checks the digest.
  Nothing the stream produced may be put in place before ``finish`` returned.

Every stage reports its busy seconds (:class:`Stages`: ``read``, ``hash``, ``decompress``,
the consumer's own ``extract``...), which ``restore --json`` and ``-v`` show.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from cloudbackup.core.errors import IntegrityError

READ_CHUNK = 1024 * 1024  # 4 MiB reads fault in a fresh mapping each (benchmarks/RESULTS.md)
QUEUE_DEPTH = 8
PIPE_SIZE = 1024 * 1024
_ABORT_WAIT = 10.0  # seconds an abort waits for the fetch thread to notice
_POLL = 0.2  # seconds a blocked hand-over waits before it looks whether the run was aborted
_INTEGRITY_HINT = "restore another copy (--from local/remote) or an older backup (--at)"
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class Stages:
    """Busy seconds per stage, added from any thread; in pipeline order."""

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self._seconds[name] = self._seconds.get(name, 0.0) + seconds

    @contextlib.contextmanager
    def timing(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)

    def as_dict(self) -> dict[str, float]:
        with self._lock:
            return {name: round(seconds, 3) for name, seconds in self._seconds.items()}

    def line(self) -> str:
        return ", ".join(f"{name} {seconds:.2f} s" for name, seconds in self.as_dict().items())


class _Aborted(Exception):
    """The pipeline was given up (by the consumer, or a stage that failed)."""


class _Clocked:
    """Adds up the seconds spent in ``read`` of the stream it wraps."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seconds = 0.0

    def read(self, size: int = -1, /) -> bytes:
        started = time.perf_counter()
        try:
            data: bytes = self.inner.read(size)
            return data
        finally:
            self.seconds += time.perf_counter() - started

    def readinto(self, buffer: Any) -> int:
        started = time.perf_counter()
        try:
            n: int = self.inner.readinto(buffer)
            return n
        finally:
            self.seconds += time.perf_counter() - started

    def readable(self) -> bool:
        return True


def _hand_over(
    chunks: queue.Queue[bytes | None],
    chunk: bytes | None,
    aborted: threading.Event,
    dropped: Callable[[], bool] = lambda: False,
) -> None:
    """Put ``chunk`` on the bounded queue, waiting while it is full: ``_Aborted`` once
    ``aborted`` is set, and given up (the chunk dropped) once ``dropped()`` says so."""
    while True:
        try:
            chunks.put(chunk, timeout=_POLL)
            return
        except queue.Full:
            if aborted.is_set():
                raise _Aborted from None
            if dropped():
                return


class _QueueReader:
    """The reading end of a bounded queue of chunks (``None``: the end)."""

    def __init__(self, chunks: queue.Queue[bytes | None], aborted: threading.Event) -> None:
        self._chunks = chunks
        self._aborted = aborted
        self._pending = memoryview(b"")
        self._done = False

    def _next(self) -> bool:
        while not self._done:
            try:
                chunk = self._chunks.get(timeout=_POLL)
            except queue.Empty:
                if self._aborted.is_set():
                    raise _Aborted from None
                continue
            if chunk is None:
                self._done = True
                return False
            self._pending = memoryview(chunk)
            return True
        return False

    def read(self, size: int = -1, /) -> bytes:
        if not self._pending and not self._next():
            return b""
        pending = self._pending
        if size < 0 or size >= len(pending):
            self._pending = memoryview(b"")
            obj = pending.obj
            return obj if len(obj) == len(pending) else bytes(pending)  # type: ignore[return-value,arg-type]
        self._pending = pending[size:]
        return bytes(pending[:size])

    def readinto(self, buffer: Any) -> int:
        if not self._pending and not self._next():
            return 0
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def readable(self) -> bool:
        return True


class Fetch:
    """Reads an archive (``opener()``: a context manager of its stream) on a thread of its
    own, hashing and counting it; the bytes come out of :attr:`stream`. ``describe`` names
    it in messages."""

    def __init__(
        self,
        opener: Callable[[], contextlib.AbstractContextManager[Readable]],
        *,
        size: int,
        sha256: str,
        describe: str,
        stages: Stages,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self.size = size
        self.sha256 = sha256
        self.describe = describe
        self.count = 0
        self.digest = ""
        self.error: BaseException | None = None
        self._opener = opener
        self._stages = stages
        self._progress = progress
        self._aborted = threading.Event()
        self._chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=QUEUE_DEPTH)
        self.stream = _QueueReader(self._chunks, self._aborted)
        #: When set (before ``start``), the bytes are written to this descriptor (a child's
        #: standard input, owned and closed by the fetch) instead of :attr:`stream`: one
        #: hand-over less, on a thread that mostly holds no GIL.
        self.sink_fd: int | None = None
        #: Set to read the rest only to check it (the consumer gave up on a damaged stream).
        self.discard = False
        self._thread = threading.Thread(target=self._run, name="restore-read", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def started(self) -> bool:
        return self._thread.ident is not None

    def _put(self, chunk: bytes | None) -> None:
        # With discard set nobody reads on: not even the end is handed over.
        _hand_over(self._chunks, chunk, self._aborted, lambda: self.discard)

    def _run(self) -> None:
        sha = hashlib.sha256()
        read_s = hash_s = 0.0
        clock = time.perf_counter
        limit = self.size + 1  # one byte more than the manifest says is enough to know
        sink = self.sink_fd
        try:
            with self._opener() as body:
                while not self._aborted.is_set():
                    t0 = clock()
                    chunk = body.read(min(READ_CHUNK, limit - self.count))
                    t1 = clock()
                    read_s += t1 - t0
                    if not chunk:
                        break
                    sha.update(chunk)
                    hash_s += clock() - t1
                    self.count += len(chunk)
                    if self._progress is not None:
                        self._progress(len(chunk))
                    if self.count > self.size:
                        break  # longer than the manifest says: finish() says so
                    if self.discard:
                        continue
                    if sink is None:
                        self._put(chunk)
                        continue
                    try:
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(sink, view) :]
                    except BrokenPipeError:
                        # The child is gone (its exit status says why): read on, to
                        # tell a damaged archive by its checksum.
                        self.discard = True
            if not self._aborted.is_set():
                self.digest = sha.hexdigest()  # read to its end (or one byte past it)
        except _Aborted:
            pass
        except BaseException as exc:  # surfaced on the consumer's side
            self.error = exc
        finally:
            if sink is not None:
                with contextlib.suppress(OSError):
                    os.close(sink)
            self._stages.add("read", read_s)
            self._stages.add("hash", hash_s)
            with contextlib.suppress(_Aborted):
                self._put(None)

    def mismatch(self) -> IntegrityError | None:
        """Once the thread is done: what is wrong with the bytes read (None: nothing)."""
        if self.error is not None or not self.digest:
            return None
        if self.count != self.size:
            more = "more than" if self.count > self.size else f"{self.count} bytes, not"
            return IntegrityError(
                f"{self.describe} fails its checksum: it has {more} the {self.size} bytes "
                "its manifest names; nothing was restored",
                _INTEGRITY_HINT,
            )
        if self.digest != self.sha256:
            return IntegrityError(
                f"{self.describe} fails its checksum: sha256 {self.digest}, the manifest "
                f"says {self.sha256}; nothing was restored",
                _INTEGRITY_HINT,
            )
        return None

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def done(self) -> bool:
        return not self._thread.is_alive()

    def abort(self) -> None:
        self._aborted.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._chunks.get_nowait()
        if self.started():
            # Bounded: a read stuck on the network ends with the store's timeout, and the
            # thread (a daemon) writes nowhere but the queue or a child's pipe meanwhile.
            self._thread.join(_ABORT_WAIT)


class Stage(Protocol):
    """One step between the fetched bytes and the tar consumer."""

    name: str

    def start(self, upstream: Readable, stages: Stages) -> Readable:
        """Begin reading ``upstream``; returns the stream of what this stage makes of it."""

    def finish(self) -> None:
        """After the downstream end was read to its end: wait; raise what went wrong."""

    def abort(self) -> None:
        """Stop at once (another stage or the consumer failed)."""

    def failure(self) -> BaseException | None:
        """Once stopped: why this stage failed on its own, if it did."""


class InlineStage:
    """A stage on the consumer's own thread: ``wrap`` makes a stream of a stream (a codec
    that releases the GIL, or input too small to pay for a process)."""

    def __init__(self, name: str, wrap: Callable[[Readable], Readable]) -> None:
        self.name = name
        self._wrap = wrap
        self._up: _Clocked | None = None
        self._down: _Clocked | None = None
        self._stages: Stages | None = None

    def start(self, upstream: Readable, stages: Stages) -> Readable:
        self._stages = stages
        self._up = _Clocked(upstream)
        self._down = _Clocked(self._wrap(self._up))
        return self._down

    def finish(self) -> None:
        if self._down is not None and self._up is not None and self._stages is not None:
            self._stages.add(self.name, self._down.seconds - self._up.seconds)
            self._stages = None

    def abort(self) -> None:
        self._stages = None

    def failure(self) -> BaseException | None:
        return None  # its errors are raised on the consumer's thread


class ThreadStage:
    """A stage on a thread of its own: ``wrap`` makes a stream of a stream (a codec that
    releases the GIL while it works, in large calls), read in pieces of up to READ_CHUNK
    bytes and handed to the consumer through a bounded queue. Its busy time is its time in
    ``wrap``'s reads less its waits for ``upstream``. An error the codec raises ends the
    stream early (the consumer sees a truncated one) and is kept, as ``errors(exc)`` makes
    it: :meth:`failure` says it, :meth:`finish` raises it."""

    def __init__(
        self,
        name: str,
        wrap: Callable[[Readable], Readable],
        *,
        errors: Callable[[BaseException], BaseException] = lambda exc: exc,
    ) -> None:
        self.name = name
        self._wrap = wrap
        self._errors = errors
        self._aborted = threading.Event()
        self._chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=QUEUE_DEPTH)
        self._error: BaseException | None = None
        self._stages: Stages | None = None
        self._thread: threading.Thread | None = None

    def start(self, upstream: Readable, stages: Stages) -> Readable:
        self._stages = stages
        self._thread = threading.Thread(
            target=self._run, args=(upstream,), name=f"restore-{self.name}", daemon=True
        )
        self._thread.start()
        return _QueueReader(self._chunks, self._aborted)

    def _put(self, chunk: bytes | None) -> None:
        _hand_over(self._chunks, chunk, self._aborted)

    def _run(self, upstream: Readable) -> None:
        up = _Clocked(upstream)
        down = _Clocked(None)
        try:
            down.inner = self._wrap(up)
            while not self._aborted.is_set():
                chunk = down.read(READ_CHUNK)
                if not chunk:
                    break
                self._put(chunk)
        except _Aborted:
            pass
        except BaseException as exc:  # the consumer sees the stream end; failure() says why
            self._error = self._errors(exc)
        finally:
            stages = self._stages
            if stages is not None:
                stages.add(self.name, down.seconds - up.seconds)
            with contextlib.suppress(_Aborted):
                self._put(None)

    def finish(self) -> None:
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        # Not joined: the thread may wait on the fetch, which is stopped after the stages;
        # it ends at its next hand-over either way (and writes nowhere but its queue).
        self._aborted.set()
        self._stages = None
        with contextlib.suppress(queue.Empty):
            while True:
                self._chunks.get_nowait()

    def failure(self) -> BaseException | None:
        return self._error


class ProcessStage:
    """A child process fed by pipes: a thread copies ``upstream`` to its standard input;
    its standard output is the stream this stage returns. Its busy time is its CPU time.
    ``errors(status, stderr)`` turns a failed exit into the error to raise."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        errors: Callable[[int, str], BaseException],
        pass_fds: Sequence[int] = (),
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.errors = errors
        self.pass_fds = tuple(pass_fds)
        self._proc: subprocess.Popen[bytes] | None = None
        self._feeder: threading.Thread | None = None
        self._feed_error: BaseException | None = None
        self._stderr = b""
        self._stderr_thread: threading.Thread | None = None
        self._stages: Stages | None = None
        self._out: Any = None
        self._killed = False

    def failure(self) -> BaseException | None:
        """Once stopped: the error of a child that failed on its own (not killed here)."""
        proc = self._proc
        if proc is None or proc.returncode in (None, 0) or self._killed:
            return None
        return self.errors(proc.returncode, self._stderr.decode("utf-8", "replace").strip())

    def spawn(self, stages: Stages) -> tuple[int, Readable]:
        """Start the child; returns its standard input (a descriptor the caller owns and
        must close at the end of the input) and the stream of its standard output."""
        self._stages = stages
        proc = self._proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
            pass_fds=self.pass_fds,
            bufsize=0,
        )
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        for pipe in (proc.stdin, proc.stdout):
            widen(pipe.fileno())
        stdin = os.dup(proc.stdin.fileno())
        os.set_inheritable(stdin, False)
        proc.stdin.close()
        proc.stdin = None
        self._stderr_thread = threading.Thread(target=self._collect, args=(proc.stderr,))
        self._stderr_thread.daemon = True
        self._stderr_thread.start()
        # Read in large pieces: every read of the pipe lets another thread take the GIL,
        # and the consumer then waits for it back (64 KiB reads cost more than they moved).
        self._out = io.BufferedReader(proc.stdout, PIPE_SIZE)  # type: ignore[arg-type]
        return stdin, self._out

    def start(self, upstream: Readable, stages: Stages) -> Readable:
        stdin, out = self.spawn(stages)
        self._feeder = threading.Thread(
            target=self._feed, args=(upstream, stdin), name=f"restore-{self.name}"
        )
        self._feeder.daemon = True
        self._feeder.start()
        return out

    def _feed(self, upstream: Readable, fd: int) -> None:
        try:
            while chunk := upstream.read(READ_CHUNK):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
        except (_Aborted, BrokenPipeError):
            pass  # the child is gone: its exit status says why
        except BaseException as exc:
            self._feed_error = exc
        finally:
            os.close(fd)

    def _collect(self, pipe: Any) -> None:
        self._stderr = pipe.read(64 * 1024)  # one line is expected; more is not kept
        with contextlib.suppress(OSError):
            while pipe.read(64 * 1024):
                pass

    def _wait(self) -> int:
        proc = self._proc
        assert proc is not None
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if self._stages is not None:
            self._stages.add(self.name, usage.ru_utime + usage.ru_stime)
        return proc.returncode

    def finish(self) -> None:
        proc = self._proc
        if proc is None:
            return
        assert self._stderr_thread is not None
        if self._feeder is not None:
            self._feeder.join()
        code = self._wait()
        self._stderr_thread.join()
        self._close()
        if self._feed_error is not None:
            raise self._feed_error
        if code != 0:
            raise self.errors(code, self._stderr.decode("utf-8", "replace").strip())

    def abort(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        # Only a child still running is killed (and said so); looked at without reaping it.
        if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            self._killed = True
        # Not proc.kill(): it reaps the child first (poll), and its CPU time is lost. The
        # pid stays this child's until it is waited for.
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        self._stages = None
        self._wait()
        if self._feeder is not None:
            self._feeder.join()
        if self._stderr_thread is not None:
            self._stderr_thread.join()
        self._close()

    def _close(self) -> None:
        proc = self._proc
        assert proc is not None
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


def widen(fd: int) -> None:
    """Make the pipe ``fd`` hold PIPE_SIZE bytes: fewer switches (best effort)."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_SIZE)


def python_child(code: str, *args: str) -> list[str]:
    """The argv of a Python child running ``code`` of this package (its ``sys.argv[1:]``:
    ``args``): this interpreter, isolated from ``PYTHON*`` variables and the user's site,
    finding this package where this process found it."""
    import cloudbackup

    home = os.path.dirname(os.path.dirname(os.path.abspath(cloudbackup.__file__)))
    prelude = f"import sys; sys.path.insert(0, {home!r}); "
    return [sys.executable, "-E", "-s", "-c", prelude + code, *args]


class Pipeline:
    """:class:`Fetch` then ``stages``, in order; ``stream`` is what the consumer reads.

    Use as a context manager: on the way out after an error every stage is stopped (a
    child killed) and the fetch thread ends; :meth:`finish` after the consumer is done
    drains the rest, waits for every stage and checks the fetched bytes.
    """

    def __init__(self, fetch: Fetch, stages: Sequence[Stage], clock: Stages) -> None:
        self.fetch = fetch
        self.stages = list(stages)
        self.clock = clock
        self._final: _Clocked | None = None
        self._finished = False

    def __enter__(self) -> Pipeline:
        stream: Readable = self.fetch.stream
        started: list[Stage] = []
        stages = self.stages
        try:
            if stages and isinstance(stages[0], ProcessStage):
                # The fetch thread writes straight into the first child: no thread between.
                self.fetch.sink_fd, stream = stages[0].spawn(self.clock)
                started.append(stages[0])
                stages = stages[1:]
            self.fetch.start()
            for stage in stages:
                stream = stage.start(stream, self.clock)
                started.append(stage)
        except BaseException:
            for stage in reversed(started):
                stage.abort()
            if self.fetch.sink_fd is not None and not self.fetch.started():
                os.close(self.fetch.sink_fd)
            self.fetch.abort()
            raise
        self._final = _Clocked(stream)
        return self

    @property
    def stream(self) -> Any:
        """The consumer's end (with ``read``)."""
        assert self._final is not None
        return self._final

    @property
    def waited(self) -> float:
        """Seconds the consumer spent reading (waiting for the stages, or running inline
        ones): the consumer's own busy time is its time less this."""
        return self._final.seconds if self._final is not None else 0.0

    def finish(self) -> None:
        """Read what is left to its end, wait for every stage and check the bytes: an
        IntegrityError when the archive is not the one the manifest names."""
        assert self._final is not None
        while self._final.read(READ_CHUNK):
            pass
        try:
            for stage in reversed(self.stages):
                stage.finish()
        except BaseException as exc:
            # What is left is read only to check it: nothing is handed on (no consumer is
            # left), and every stage is stopped first — a child still writing into a pipe
            # nobody reads would hold the fetch in its write to that child for good.
            self.fetch.discard = True
            for stage in reversed(self.stages):
                stage.abort()
            self.fetch.join()
            verdict = self._verdict()
            if verdict is None:
                raise
            raise verdict from exc
        self.fetch.join()
        self._finished = True
        if self.fetch.error is not None:
            raise self.fetch.error
        problem = self.fetch.mismatch()
        if problem is not None:
            raise problem

    def _verdict(self) -> IntegrityError | None:
        """When the fetch is complete: the checksum failure that explains a stage's or the
        consumer's (a damaged archive fails its checksum first)."""
        return self.fetch.mismatch() if self.fetch.done() else None

    def explain(self, exc: BaseException, *, damaged: bool = False) -> BaseException:
        """The error to report for ``exc``, raised by the consumer, once every stage is
        stopped: the fetch's own error when it failed (a consumer sees its failure as a
        truncated stream), else ``exc``. ``damaged``: ``exc`` says the stream is corrupt;
        the rest of the archive is then read (not decoded) to check it, and a checksum
        failure, the truer cause, is reported instead."""
        if damaged:
            self.fetch.discard = True
        for stage in reversed(self.stages):
            stage.abort()
        if damaged:
            self.fetch.join()
        self.fetch.abort()
        if self.fetch.error is not None:
            return self.fetch.error
        verdict = self._verdict()
        if verdict is not None:
            return verdict
        for stage in self.stages:  # the first stage that failed on its own says why
            failure = stage.failure()
            if failure is not None:
                return failure
        return exc

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        if not self._finished:
            for stage in reversed(self.stages):
                stage.abort()
            self.fetch.abort()
