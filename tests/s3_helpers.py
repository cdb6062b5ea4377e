"""A fault-injecting HTTP proxy in front of a moto server, and a recorder of every request.

    with FaultProxy(moto_endpoint) as proxy:
        proxy.inject(Fault("slowdown", operation="UploadPart", times=2))
        proxy.inject(Fault("reset", operation="PutObject"))
        ...  # point CLOUDBACKUP_S3_ENDPOINT_URL (or a boto3 client) at proxy.endpoint
        assert proxy.count("GetObject") == 0
        for req in proxy.requests("UploadPart"):
            assert req.headers["x-amz-checksum-sha256"] == req.body_sha256_b64

Faults are matched in the order they were injected; each one applies to ``times`` matching
requests (``None``: every one). Actions:

* ``slowdown`` — answer 503 ``SlowDown`` (the request never reaches moto);
* ``error`` — answer ``status`` with ``code`` (e.g. 500 ``InternalError``, 403 ``ExpiredToken``);
* ``deny`` — answer 403 ``AccessDenied``;
* ``reset`` — read half of the body, then close the socket with an RST (nothing forwarded);
* ``delay`` — wait ``seconds``, then forward;
* ``drop`` — forward to moto, then reset instead of answering: the request took effect but
  the client never heard (a retried CompleteMultipartUpload then meets ``NoSuchUpload``);
* ``hold`` — keep the request hanging until :meth:`FaultProxy.release` (or ``seconds``), then
  reset it without forwarding: an upload that is "in flight" when the client is killed;
* ``truncate`` — forward to moto, answer with the full ``Content-Length`` but send only the
  first half of the body, then reset: a download broken in the middle of its body.

The proxy speaks plain HTTP/1.1 with keep-alive (as botocore does against an ``http://``
endpoint) and forwards each request on a fresh connection to moto.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
}


@dataclass
class Request:
    """One request the proxy saw (whatever happened to it)."""

    method: str
    path: str  # unquoted, path-style: /bucket/key
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    body_size: int
    body_sha256: bytes  # raw digest of the body as received
    action: str = "forward"  # or the fault applied
    status: int | None = None  # None: the connection was reset
    started: float = 0.0
    finished: float = 0.0

    @property
    def bucket(self) -> str:
        return self.path.lstrip("/").split("/", 1)[0]

    @property
    def key(self) -> str:
        parts = self.path.lstrip("/").split("/", 1)
        return parts[1] if len(parts) == 2 else ""

    @property
    def body_sha256_b64(self) -> str:
        return base64.b64encode(self.body_sha256).decode()

    @property
    def part_number(self) -> int | None:
        value = self.query.get("partNumber")
        return int(value[0]) if value else None

    @property
    def operation(self) -> str:
        return operation_of(self.method, self.key, self.query, self.headers)


def operation_of(
    method: str, key: str, query: dict[str, list[str]], headers: dict[str, str]
) -> str:
    """The S3 API operation of a path-style request."""
    q = query
    if not key:  # bucket-level
        if method == "GET":
            if "uploads" in q:
                return "ListMultipartUploads"
            if "object-lock" in q:
                return "GetObjectLockConfiguration"
            return "ListObjectsV2" if q.get("list-type") == ["2"] else "ListObjects"
        if method == "POST" and "delete" in q:
            return "DeleteObjects"
        return {"PUT": "CreateBucket", "HEAD": "HeadBucket", "DELETE": "DeleteBucket"}.get(
            method, f"{method} bucket"
        )
    if method == "PUT":
        if "partNumber" in q and "uploadId" in q:
            return "UploadPartCopy" if "x-amz-copy-source" in headers else "UploadPart"
        if "tagging" in q:
            return "PutObjectTagging"
        if "retention" in q:
            return "PutObjectRetention"
        return "CopyObject" if "x-amz-copy-source" in headers else "PutObject"
    if method == "POST":
        if "uploads" in q:
            return "CreateMultipartUpload"
        if "uploadId" in q:
            return "CompleteMultipartUpload"
    if method == "GET":
        if "uploadId" in q:
            return "ListParts"
        if "tagging" in q:
            return "GetObjectTagging"
        if "retention" in q:
            return "GetObjectRetention"
        if "attributes" in q:
            return "GetObjectAttributes"
        return "GetObject"
    if method == "HEAD":
        return "HeadObject"
    if method == "DELETE":
        return "AbortMultipartUpload" if "uploadId" in q else "DeleteObject"
    return f"{method} object"


@dataclass
class Fault:
    """What to do to requests that match (``operation`` and ``when``, both optional)."""

    action: str  # slowdown | error | deny | reset | delay | hold | drop | truncate
    operation: str | None = None
    when: Callable[[Request], bool] | None = None
    times: int | None = 1
    seconds: float = 0.0
    status: int = 500
    code: str = "InternalError"
    message: str = "injected by the test proxy"
    applied: int = 0

    def matches(self, request: Request) -> bool:
        if self.times is not None and self.applied >= self.times:
            return False
        if self.operation is not None and request.operation != self.operation:
            return False
        return self.when is None or self.when(request)


def error_xml(code: str, message: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        "<RequestId>PROXY</RequestId><HostId>PROXY</HostId></Error>"
    ).encode()


class FaultProxy:
    """A threaded HTTP proxy on 127.0.0.1 in front of ``upstream`` (a moto server URL)."""

    def __init__(self, upstream: str) -> None:
        parsed = urlsplit(upstream)
        self.upstream_host = parsed.hostname or "127.0.0.1"
        self.upstream_port = parsed.port or 80
        self.faults: list[Fault] = []
        self.log: list[Request] = []
        self.lock = threading.Lock()
        self.released = threading.Event()
        self.in_flight: dict[str, int] = {}
        self.max_in_flight: dict[str, int] = {}
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        self.thread.start()
        return self

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the script

    def inject(self, *faults: Fault) -> None:
        with self.lock:
            self.faults.extend(faults)

    def clear(self) -> None:
        """Drop every fault and the recorded requests (a fresh scene for the next step)."""
        with self.lock:
            self.faults.clear()
            self.log.clear()
            self.max_in_flight.clear()

    def release(self) -> None:
        """Let every held request go (they are reset, never forwarded)."""
        self.released.set()

    def _fault_for(self, request: Request) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.matches(request):
                    fault.applied += 1
                    return fault
        return None

    # -- the recorder

    def requests(self, operation: str | None = None, *, forwarded: bool = False) -> list[Request]:
        with self.lock:
            found = [r for r in self.log if operation is None or r.operation == operation]
        if forwarded:
            found = [r for r in found if r.action in ("forward", "delay", "drop", "truncate")]
        return found

    def count(self, operation: str | None = None, *, forwarded: bool = False) -> int:
        return len(self.requests(operation, forwarded=forwarded))

    def operations(self) -> list[str]:
        return [r.operation for r in self.requests()]

    def wait_for(
        self, predicate: Callable[[FaultProxy], bool], timeout: float = 30.0, interval: float = 0.01
    ) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            time.sleep(interval)
        return predicate(self)

    def _enter(self, operation: str) -> None:
        with self.lock:
            now = self.in_flight.get(operation, 0) + 1
            self.in_flight[operation] = now
            self.max_in_flight[operation] = max(self.max_in_flight.get(operation, 0), now)

    def _leave(self, operation: str) -> None:
        with self.lock:
            self.in_flight[operation] -= 1

    def _record(self, request: Request) -> None:
        with self.lock:
            self.log.append(request)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: FaultProxy

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
        pass

    def _read_body(self, limit: int | None = None) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if limit is not None:
            length = min(length, limit)
        return self.rfile.read(length) if length else b""

    def _reset(self) -> None:
        """Close with an RST: the client sees ECONNRESET, as with a dropped load balancer."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    def _answer(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response_only(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.command == "HEAD":
            if not headers or "Content-Length" not in headers:
                self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        self.wfile.flush()

    def _handle(self) -> None:
        owner = self.owner
        split = urlsplit(self.path)
        headers = {k.lower(): v for k, v in self.headers.items()}
        query = parse_qs(split.query, keep_blank_values=True)
        probe = Request(self.command, unquote(split.path), query, headers, 0, b"")
        operation = probe.operation
        fault = owner._fault_for(probe)
        started = time.monotonic()
        owner._enter(operation)

        def seen(body: bytes) -> Request:
            action = fault.action if fault else "forward"
            digest = hashlib.sha256(body).digest()
            return Request(
                self.command, probe.path, query, headers, len(body), digest, action, None, started
            )

        try:
            if fault is not None and fault.action in ("reset", "hold"):
                expected = int(headers.get("content-length") or 0)
                request = seen(self._read_body(limit=expected // 2))
                owner._record(request)  # visible while it hangs
                if fault.action == "hold":
                    owner.released.wait(fault.seconds or None)
                request.finished = time.monotonic()
                self._reset()
                return
            body = self._read_body()
            request = seen(body)
            if fault is not None and fault.action in ("slowdown", "error", "deny"):
                status, code, message = {
                    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
                    "deny": (403, "AccessDenied", "Access Denied"),
                    "error": (fault.status, fault.code, fault.message),
                }[fault.action]
                request.status = status
                request.finished = time.monotonic()
                owner._record(request)
                self._answer(status, error_xml(code, message), {"Content-Type": "application/xml"})
                return
            if fault is not None and fault.action == "delay":
                time.sleep(fault.seconds)
            status, reason, out_headers, out_body = self._forward(body)
            request.status = status
            request.finished = time.monotonic()
            owner._record(request)
            if fault is not None and fault.action == "drop":
                self._reset()
                return
            if fault is not None and fault.action == "truncate":
                self.send_response_only(status, reason)
                for name, value in out_headers:
                    if name.lower() in _HOP_BY_HOP or name.lower() == "content-length":
                        continue
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(out_body)))
                self.end_headers()
                self.wfile.write(out_body[: len(out_body) // 2])
                self.wfile.flush()
                self._reset()
                return
            self.send_response_only(status, reason)
            for name, value in out_headers:
                if name.lower() in _HOP_BY_HOP or name.lower() == "content-length":
                    continue
                self.send_header(name, value)
            if self.command == "HEAD":
                length = dict((k.lower(), v) for k, v in out_headers).get("content-length", "0")
                self.send_header("Content-Length", length)
                self.end_headers()
            else:
                self.send_header("Content-Length", str(len(out_body)))
                self.end_headers()
                self.wfile.write(out_body)
            self.wfile.flush()
        finally:
            owner._leave(operation)

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        owner = self.owner
        conn = http.client.HTTPConnection(owner.upstream_host, owner.upstream_port, timeout=120)
        try:
            headers = {
                k: v
                for k, v in self.headers.items()
                if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length"
            }
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.reason, resp.getheaders(), data
        finally:
            conn.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle


@contextmanager
def fault_proxy(upstream: str) -> Iterator[FaultProxy]:
    with FaultProxy(upstream) as proxy:
        yield proxy


@dataclass
class Sleeps:
    """An injectable ``sleep`` that records the waits instead of waiting."""

    waits: list[float] = field(default_factory=list)

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
