"""serve_channel: the conda channel over HTTP, on a thread, for as long as a task needs it.

``served_channel()`` is a context manager around a standard-library ``HTTPServer`` that gives
conda clients what ``python -m http.server`` does not: HTTP/1.1 keep-alive, a listen backlog
of 1024, ETag and Last-Modified on every 200 and 304 (rattler rejects a bare 304),
``Cache-Control`` per file kind, HEAD, single byte ranges and ``sendfile`` downloads.
It serves regular files below the channel directory and nothing else, never lists folders,
refuses write methods, and with a token serves only ``/t/<token>/...`` (the conda token URL
form). Leaving the ``with`` block, by success, error or Ctrl-C, closes the port.

Connections cost no thread while they wait (``tasks.connections``): a request reaches one
of a small pool of worker threads only once all of it has arrived, and what a client does
not take at once of its answer goes out as it takes it, so idle, slow-sending and
slow-reading clients hold no worker. ``ConnectionLimits`` cap open connections (at the cap
the one idle longest is closed to make room, never one taking an answer), idle time, header
time and send time. A request head over 64 KiB gets 431, an HTTP/2 request 505, and the
connection closes.

Tokens: ``serve_channel`` uses the ``channel.token`` setting. The server that image builds
share never does: it has no token on loopback, else a fresh random one per run that dies
with it, and lets clients on this machine in without any, so local builds carry none.
"""

from __future__ import annotations

import errno
import hmac
import io
import os
import queue
import re
import secrets
import select
import socket
import socketserver
import sys
import threading
import time
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import formatdate, parsedate_to_datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from stat import S_ISDIR, S_ISLNK, S_ISREG
from typing import Iterator, TextIO
from urllib.parse import unquote

from ..core.commands import log_path
from ..core.errors import HubworksError, reports_errors
from ..core.netaddr import (ip_address, is_loopback, listens_everywhere, local_address,
                            machine_name, url_host)
from ..core.reporter import print_line
from ..core.settings import TOKEN_PATTERN, Settings
from .connections import (MAX_HEAD, Client, ClientWriter, ConnectionLimits, WaitingRoom,
                          head_length, open_file_budget)

NO_CACHE = "no-cache"
IMMUTABLE = "public, max-age=31536000, immutable"
CONTENT_TYPES = {
    ".json": "application/json",
    ".zst": "application/zstd",
    ".bz2": "application/x-bzip2",
    ".conda": "application/octet-stream",
    ".html": "text/html; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".md": "text/plain; charset=utf-8",
}
READ_METHODS = "GET, HEAD"
_TOKEN_IN_PATH = re.compile(r"/t/[^/\s?#'\"]+")
_BYTE_RANGE = re.compile(r"bytes=(\d*)-(\d*)", re.IGNORECASE)
# C0 and C1 control characters and DEL, written as \xNN: a request cannot forge log lines
# or send escape sequences to the terminal of whoever reads the log.
_CONTROL_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7f, 0xa0))}

SMALL_FILE = 64 * 1024  # files up to this size are kept in memory and sent with their headers
_FILE_CACHE_BYTES = 64 << 20


def content_type(name: str) -> str:
    if name.endswith(".tar.bz2"):
        return "application/x-tar"
    return CONTENT_TYPES.get(Path(name).suffix, "application/octet-stream")


def cache_control(path: Path) -> str:
    """Packages and content-addressed shards never change under their name; the rest
    (repodata*, the shard index, index.html) changes with each index run: revalidate."""
    if path.name.endswith((".conda", ".tar.bz2")):
        return IMMUTABLE
    if path.parent.name == "shards" and path.name.endswith(".msgpack.zst"):
        return IMMUTABLE
    return NO_CACHE


def redact(text: str) -> str:
    return _TOKEN_IN_PATH.sub("/t/<token>", text)


def printable(text: str) -> str:
    """``text`` with control characters escaped, safe to write as one log line."""
    return text.translate(_CONTROL_ESCAPES)


class Refusal(Exception):
    """An answer other than the file: a status and the headers that go with it."""

    def __init__(self, status: int, headers: dict[str, str] | None = None):
        super().__init__(status)
        self.status = status
        self.headers = headers or {}


def channel_file(root: Path, token: str | None, target: str) -> tuple[str, os.stat_result]:
    """The regular file below ``root`` (resolved) that a request target names, with its
    stat.

    Raises Refusal: 403 without the token, 404 for anything outside ``root`` or not a
    file, 301 to add the slash a folder with an index.html needs for its relative links
    (the token's own root, ``/t/<token>``, included).
    """
    path = target.split("?", 1)[0].split("#", 1)[0]
    if not path.startswith("/"):
        raise Refusal(404)  # absolute-form targets are for proxies
    if token is not None:
        parts = path.split("/", 3)
        given = parts[2] if len(parts) > 2 and parts[1] == "t" else ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise Refusal(403)
        if len(parts) == 3:
            raise Refusal(301, {"Location": path + "/"})
        path = "/" + parts[3]
    name = unquote(path)
    if "\\" in name or "\0" in name:
        raise Refusal(404)
    segments = [s for s in name.split("/") if s not in ("", ".")]
    if ".." in segments:
        raise Refusal(404)
    found, stat = _inside(str(root), segments)
    if S_ISDIR(stat.st_mode):
        found, stat = _inside(str(root), [*segments, "index.html"])
        if not path.endswith("/") and S_ISREG(stat.st_mode):
            raise Refusal(301, {"Location": target.split("?", 1)[0] + "/"})
    if not S_ISREG(stat.st_mode):
        raise Refusal(404)
    return found, stat


def _inside(root: str, segments: list[str]) -> tuple[str, os.stat_result]:
    """The real path of ``root/segments`` and its stat, if it exists and stays below
    ``root`` (itself resolved); symlinks are followed only where they stay inside."""
    path, stat = root, None
    for at, segment in enumerate(segments):
        path = f"{path}/{segment}"
        try:
            stat = os.lstat(path)
        except (OSError, ValueError):
            raise Refusal(404) from None
        if S_ISLNK(stat.st_mode):
            return _resolved(root, os.path.join(path, *segments[at + 1:]))
    return path, stat or os.stat(root)


def _resolved(root: str, path: str) -> tuple[str, os.stat_result]:
    try:
        real = os.path.realpath(path, strict=True)
        stat = os.stat(real)
    except (OSError, ValueError):
        raise Refusal(404) from None
    if real != root and not real.startswith(root + "/"):
        raise Refusal(404)
    return real, stat


def byte_range(header: str, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a single range; None means send the whole file.

    Several ranges, or a range we cannot read, get the whole file (RFC 9110 allows it);
    a range that starts past the end raises Refusal(416). A last byte past the end means
    the end, a suffix longer than the file the whole file, however many digits they have.
    """
    match = _BYTE_RANGE.fullmatch(header.strip())
    if not match or not (match[1] or match[2]):
        return None
    if match[1]:
        first, last = _position(match[1]), _position(match[2]) if match[2] else size - 1
    else:  # the last N bytes; the last 0 bytes is no range at all
        suffix = _position(match[2])
        first, last = (size - suffix if suffix else size), size - 1
    if first >= size:
        raise Refusal(416, {"Content-Range": f"bytes */{size}"})
    if last < first:
        return None
    return max(first, 0), min(last, size - 1)


def _position(digits: str) -> int:
    # More digits than any file size has is past every end; int() refuses 4,300 digits.
    return int(digits) if len(digits) <= 18 else 1 << 62


@dataclass(frozen=True)
class FileFacts:
    """What the answer for one version of a file needs: validators, type, and for a small
    file its bytes. ``version`` is (device, inode, size, mtime): a new version, a new entry."""

    version: tuple[int, int, int, int]
    etag: str
    mtime: float
    header_lines: str  # ETag, Last-Modified, Cache-Control, Content-Type, Accept-Ranges
    validator_lines: str  # ETag, Last-Modified, Cache-Control: what a 304 carries
    content: bytes | None
    ok_lines: bytes = b""  # header_lines with Content-Length and the blank line, encoded
    fresh_lines: bytes = b""  # validator_lines and the blank line, encoded

    @classmethod
    def of(cls, path: Path, stat: os.stat_result, content: bytes | None) -> FileFacts:
        etag = f'"{stat.st_size:x}-{stat.st_mtime_ns:x}"'
        validators = (f"ETag: {etag}\r\n"
                      f"Last-Modified: {formatdate(stat.st_mtime, usegmt=True)}\r\n"
                      f"Cache-Control: {cache_control(path)}\r\n")
        lines = (f"{validators}Content-Type: {content_type(path.name)}\r\n"
                 "Accept-Ranges: bytes\r\n")
        return cls(version=_version(stat), etag=etag, mtime=stat.st_mtime,
                   header_lines=lines, validator_lines=validators, content=content,
                   ok_lines=f"{lines}Content-Length: {stat.st_size}\r\n\r\n".encode("latin-1"),
                   fresh_lines=f"{validators}\r\n".encode("latin-1"))

    @property
    def size(self) -> int:
        return self.version[2]

    @property
    def last_modified(self) -> str:
        return formatdate(self.mtime, usegmt=True)


def _version(stat: os.stat_result) -> tuple[int, int, int, int]:
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


class FileCache:
    """FileFacts by path, valid while the file's (device, inode, size, mtime) stays the same:
    a stat per request instead of an open, a read and date formatting."""

    def __init__(self, budget: int = _FILE_CACHE_BYTES):
        self.facts: dict[str, FileFacts] = {}
        self.budget, self.held = budget, 0
        self.lock = threading.Lock()

    def lookup(self, path: str, stat: os.stat_result) -> FileFacts:
        """The facts of the file at ``path`` whose stat was just taken."""
        version = _version(stat)
        known = self.facts.get(path)
        if known is not None and known.version == version:
            return known
        with open(path, "rb") as file:
            stat = os.fstat(file.fileno())  # the facts describe the bytes read, mid-reindex too
            content = file.read(SMALL_FILE + 1) if stat.st_size <= SMALL_FILE else None
        if content is not None and len(content) != stat.st_size:
            content = None  # it changed while being read: serve it from disk this time
        facts = FileFacts.of(Path(path), stat, content)
        with self.lock:
            if self.held > self.budget or len(self.facts) > 100_000:
                self.facts.clear()  # a crude bound; a channel's hot files come back quickly
                self.held = 0
            self.facts[path] = facts
            self.held += len(content or b"") + 256
        return facts


class BadHeaders(Exception):
    """Headers the server refuses to read: the status to answer and why."""

    def __init__(self, status: HTTPStatus, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


class RequestHeaders(dict):
    """A request's headers by lower-case name; a repeated header's values joined by ", "
    (RFC 9110), which also makes two Content-Length headers unreadable as one number."""

    def add(self, name: str, value: str) -> None:
        key = name.lower()
        dict.__setitem__(self, key, f"{dict.get(self, key)}, {value}" if key in self else value)

    def get(self, name: str, default=None):
        return dict.get(self, name.lower(), default)

    def __getitem__(self, name: str):
        return dict.get(self, name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and dict.__contains__(self, name.lower())


class ChannelRequestHandler(BaseHTTPRequestHandler):
    """GET and HEAD of channel files; write methods refused with 405.

    One handler answers one request. The server reads the whole request before a worker
    thread runs the handler, so ``rfile`` is that request in memory, and what the client
    does not take at once of the answer is sent by the waiting room: a worker never waits
    for a client.
    """

    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse one connection per host
    server_version = "hubworks-channel"
    server: ChannelServer
    request: Client

    def setup(self) -> None:
        self.connection = self.request.sock
        request = self.request.take_request()
        self.head_too_large = request is None
        self.rfile = io.BytesIO(request or b"")
        self.wfile = ClientWriter(self.request)

    def handle(self) -> None:
        self.close_connection = True
        self.command, self.path, self.status, self.sent = None, "", None, 0
        self.raw_requestline, self.request_version = b"", self.default_request_version
        self.cut_short = False
        started = time.perf_counter()
        if self.head_too_large:
            self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                            f"Request head over {MAX_HEAD} bytes")
        else:
            self.handle_one_request()
        if self.status is not None:  # logged once the whole answer is out
            self.request.answered = (self.command, self.path, self.status, self.sent, started,
                                     self.cut_short)

    def parse_request(self) -> bool:
        """The standard library's parse_request for the common request line (method,
        target, HTTP/1.0 or 1.1), without its email parser: headers are split straight
        from the request, which arrived whole. Other forms go to the standard library."""
        words = self.raw_requestline.split()
        if not words:  # the standard library would close without a word
            self.send_error(HTTPStatus.BAD_REQUEST, "Empty request line")
            return False
        if len(words) != 3 or words[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
            return super().parse_request()
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        command, path, version = (str(word, "iso-8859-1") for word in words)
        if path.startswith("//"):  # as the standard library: no open redirect (gh-87389)
            path = "/" + path.lstrip("/")
        self.command, self.path, self.request_version = command, path, version
        self.close_connection = version == "HTTP/1.0"
        try:
            self.headers = self.read_headers()
        except BadHeaders as refused:
            self.send_error(refused.status, refused.reason)
            return False
        connection = self.headers.get("Connection", "").lower()
        if connection == "close":
            self.close_connection = True
        elif connection == "keep-alive":
            self.close_connection = False
        return True

    def read_headers(self) -> RequestHeaders:
        """The header lines of the request, up to the blank line."""
        headers = RequestHeaders()
        name = ""
        for count, line in enumerate(self.rfile):
            if line in (b"\r\n", b"\n"):
                break
            if count >= 100:
                raise BadHeaders(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "Too many headers")
            text = str(line, "iso-8859-1")
            if text[0] in " \t" and name:  # an obsolete folded line continues the last one
                headers.add(name, text.strip())
                continue
            name, colon, value = text.partition(":")
            if colon and name != name.rstrip(" \t"):
                # RFC 9112 5.1: a server must refuse it, since a proxy before it may have read
                # the line another way (a "Content-Length :" smuggles a body past it)
                raise BadHeaders(HTTPStatus.BAD_REQUEST,
                                 f"Whitespace between the header name {name.strip()!r} and "
                                 f"its colon")
            if colon:
                headers.add(name.strip(), value.strip())
        return headers

    def finish(self) -> None:
        pass  # the connection outlives the handler: the server closes it or waits for more

    def handle_expect_100(self) -> bool:
        return True  # no 100 Continue: the body is never read, and the connection closes

    def send_error(self, code: int, message: str | None = None, explain=None) -> None:
        """Refuse the request and close: a status line always (the standard library sends
        none when it could not read the version, as for HTTP/2.0), a short text body."""
        self.close_connection = True
        self.request.unread_body = True  # the client may send on: let it read this first
        if message:
            self.log_error("code %d, message %s", code, message)
        if self.request_version == "HTTP/0.9":  # the standard library's: version unread
            self.request_version = self.protocol_version
        self.send_status(code, with_body=self.command != "HEAD")

    def do_GET(self) -> None:
        self.answer(with_body=True)

    def do_HEAD(self) -> None:
        self.answer(with_body=False)

    def do_POST(self) -> None:
        self.drop_body()
        self.send_status(405, {"Allow": READ_METHODS})

    do_PUT = do_DELETE = do_PATCH = do_POST

    def drop_body(self) -> None:
        """Drop the request's body: the server read it if small; if not (large, chunked),
        the connection closes after the answer, so the body is never taken for a request."""
        body = len(self.rfile.read())
        declared = self.headers.get("Content-Length", "0").strip()
        if "Transfer-Encoding" in self.headers or declared != str(body):
            self.close_connection = True
            self.request.unread_body = True

    def answer(self, with_body: bool) -> None:
        self.drop_body()
        try:
            token = self.server.token_for(self.client_address[0], self.path)
            path, stat = channel_file(self.server.root, token, self.path)
            self.send_file(path, stat, with_body)
        except Refusal as refusal:
            self.send_status(refusal.status, refusal.headers, with_body)
        except OSError as exc:
            if self.status is not None:  # the client went away mid-answer
                self.close_connection = self.cut_short = True
                return
            self.log_error("cannot read %s: %s", self.path, exc)
            self.send_status(404, with_body=with_body)

    def send_file(self, path: str, stat: os.stat_result, with_body: bool) -> None:
        facts = self.server.files.lookup(path, stat)
        if self.request_version == "HTTP/1.1":
            self.server.remember_route(self.path, path)
        if facts.content is not None or self.is_fresh(facts):
            self.send_facts(facts, facts.content or b"", with_body)
            return
        with open(path, "rb") as file:
            stat = os.fstat(file.fileno())  # the validators describe the bytes we send
            if _version(stat) != facts.version:
                facts = FileFacts.of(Path(path), stat, None)
            self.send_facts(facts, file, with_body)

    def send_facts(self, facts: FileFacts, content: bytes | io.BufferedReader,
                   with_body: bool) -> None:
        if self.is_fresh(facts):
            # No Content-Length: some clients (wrk's parser) would wait for that many bytes.
            self.send_head(304, facts.validator_lines)
            return
        size, first, count = facts.size, 0, facts.size
        lines = facts.header_lines
        wanted = self.headers.get("Range")
        span = byte_range(wanted, size) if wanted and self.range_applies(facts) else None
        if span is not None:
            first, count = span[0], span[1] - span[0] + 1
            lines += f"Content-Range: bytes {span[0]}-{span[1]}/{size}\r\n"
        status = 200 if span is None else 206
        if not with_body or not count:
            self.send_head(status, lines, count)
        elif isinstance(content, bytes):
            self.send_head(status, lines, count, content[first:first + count])
        else:
            self.send_head(status, lines, count)
            self.sent = count  # less what the client never takes, once it is done
            self.request.send_file(content, first, count)

    def is_fresh(self, facts: FileFacts) -> bool:
        """The client's copy is current: If-None-Match decides, else If-Modified-Since."""
        tags = self.headers.get("If-None-Match")
        if tags is not None:
            if tags == facts.etag:
                return True
            given = {tag.strip().removeprefix("W/") for tag in tags.split(",")}
            return "*" in given or facts.etag in given
        since = self.headers.get("If-Modified-Since")
        if not since:
            return False
        try:
            when = parsedate_to_datetime(since)
        except (TypeError, ValueError):
            return False
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        return int(facts.mtime) <= when.timestamp()

    def range_applies(self, facts: FileFacts) -> bool:
        """If-Range: the range only holds for the version the client names."""
        condition = self.headers.get("If-Range")
        return condition is None or condition.strip() in (facts.etag, facts.last_modified)

    def send_head(self, status: int, lines: str, length: int | None = None,
                  body: bytes = b"") -> None:
        """Status line, headers (``lines``, each ending CRLF) and ``body`` in one send."""
        self.log_request(status)
        if self.request_version == "HTTP/0.9":
            self.wfile.write(body)
        else:
            if length is not None:
                lines += f"Content-Length: {length}\r\n"
            if self.close_connection:
                lines += "Connection: close\r\n"
            elif self.request_version == "HTTP/1.0":
                lines += "Connection: keep-alive\r\n"
            head = (f"{self.protocol_version} {status} {_PHRASES[status]}\r\n"
                    f"Server: {_SERVER_HEADER}\r\nDate: {http_date()}\r\n{lines}\r\n")
            self.wfile.write(head.encode("latin-1") + body)
        self.sent = len(body)

    def send_status(self, status: int, headers: dict[str, str] | None = None,
                    with_body: bool = True) -> None:
        """A short text answer that keeps the connection usable (send_error closes it)."""
        text = f"{status} {_PHRASES[status]}\n".encode()
        lines = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        self.send_head(status, lines + "Content-Type: text/plain; charset=utf-8\r\n",
                       len(text), text if with_body else b"")

    def version_string(self) -> str:
        return _SERVER_HEADER

    def log_request(self, code="-", size="-") -> None:
        self.status = int(code)  # the server writes one line when the request is done

    def log_message(self, format: str, *args) -> None:
        self.server.write_log(f"{self.client_address[0]} {format % args}")


_PHRASES = {status.value: status.phrase for status in HTTPStatus}
_SERVER_HEADER = f"{ChannelRequestHandler.server_version} Python/{sys.version.split()[0]}"
_date_second, _date_text = 0, ""
# Headers after which a request is no longer a plain GET or HEAD of a whole file: a handler
# reads it (a body, a range, a date condition, a close).
_NOT_PLAIN = (b"content-length", b"transfer-encoding", b"expect", b"range", b"if-range",
              b"if-modified-since", b"connection")
_MAX_PLAIN_HEADERS = 100


def plain_request(head: bytes) -> tuple[bytes, str, bytes | None] | None:
    """(method, target, If-None-Match) of a request head (its blank line included) that is
    a keep-alive HTTP/1.1 GET or HEAD of a whole file with no body; None for any other
    request, which a handler reads in full."""
    lines = head.split(b"\n")
    words = lines[0].split()
    if len(words) != 3 or words[2] != b"HTTP/1.1" or words[0] not in (b"GET", b"HEAD") \
            or not words[1].startswith(b"/") or words[1].startswith(b"//") \
            or len(lines) > _MAX_PLAIN_HEADERS + 3:
        return None
    tags = None
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            return None  # a folded line
        name, colon, value = line.partition(b":")
        if not colon:
            continue
        if name[-1:] in (b" ", b"\t"):
            return None  # refused by the handler (RFC 9112 5.1)
        name = name.strip().lower()
        if name == b"if-none-match":
            if tags is not None:
                return None  # repeated: the handler joins the values
            tags = value.strip()
        elif name in _NOT_PLAIN:
            if name != b"connection" or value.strip().lower() != b"keep-alive":
                return None
    return words[0], str(words[1], "iso-8859-1"), tags


def http_date() -> str:
    """The Date header's value, formatted once a second."""
    global _date_second, _date_text
    now = int(time.time())
    if now != _date_second:
        _date_second, _date_text = now, formatdate(now, usegmt=True)
    return _date_text


_status_heads: dict[int, tuple[str, bytes]] = {}


def status_head(status: int) -> bytes:
    """Status line, Server and Date of an HTTP/1.1 answer, encoded once a second."""
    date = http_date()
    known = _status_heads.get(status)
    if known is None or known[0] != date:
        known = _status_heads[status] = (date, (
            f"HTTP/1.1 {status} {_PHRASES[status]}\r\nServer: {_SERVER_HEADER}\r\n"
            f"Date: {date}\r\n").encode("latin-1"))
    return known[1]


class AccessLog:
    """The access log, written by a thread of its own: a request never waits for the file,
    and the line is formatted off the request's path. Tokens appear as ``<token>``,
    control characters escaped. Lines go out in batches, at most BATCH_SECONDS late."""

    # Waking the thread for each line made every request hand the interpreter lock over
    # and back; a thread that sleeps between batches is woken by nobody.
    BATCH_SECONDS = 0.05

    def __init__(self, stream: TextIO, token: str | None):
        self.stream, self.token = stream, token
        self.entries: queue.SimpleQueue = queue.SimpleQueue()
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self.run, name="channel-access-log", daemon=True)
        self.thread.start()

    def request(self, client: str, command: str | None, path: str, status: int, sent: int,
                seconds: float, cut_short: bool = False) -> None:
        self.entries.put((time.time(), client, command, path, status, sent, seconds,
                          cut_short))

    def message(self, text: str) -> None:
        self.entries.put((time.time(), text))

    def run(self) -> None:
        while True:
            entry = self.entries.get()
            while entry is not None:
                self.stream.write(self.line(entry))
                try:
                    entry = self.entries.get_nowait()
                except queue.Empty:
                    break
            self.stream.flush()
            if entry is None:
                return
            self.closing.wait(self.BATCH_SECONDS)

    def line(self, entry: tuple) -> str:
        if len(entry) == 2:
            when, text = entry
        else:
            when, client, command, path, status, sent, seconds, cut_short = entry
            text = (f"{client} {command or '-'} {path or '-'} {status} {sent} "
                    f"{seconds * 1000:.1f}ms" + (" cut-short" if cut_short else ""))
        text = redact(text)
        if self.token:  # also where a client put the token somewhere else
            text = text.replace(self.token, "<token>")
        stamp = datetime.fromtimestamp(when).isoformat(timespec="seconds")
        return f"{stamp} {printable(text)}\n"

    def close(self) -> None:
        self.closing.set()
        self.entries.put(None)
        self.thread.join()


class ChannelServer(HTTPServer):
    """An HTTP server over one channel folder: a thread accepts connections (serve_forever),
    a WaitingRoom holds them between requests, a pool of workers answers, counters and
    an access log record what was sent."""

    request_queue_size = 1024  # bursts of new connections; the default backlog is 5

    def __init__(self, address: tuple[str, int], root: Path, token: str | None,
                 log: AccessLog | None, limits: ConnectionLimits = ConnectionLimits(),
                 local_clients_without_token: bool = False):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.root, self.token, self.log, self.limits = root, token, log, limits
        self.local_clients_without_token = local_clients_without_token
        self.requests_served = self.bytes_sent = 0
        self.lock = threading.Lock()
        self.open_clients: set[Client] = set()
        self.files = FileCache()
        self.routes: dict[str, str] = {}  # request target -> the file it names
        # Each connection is a file; leave room for files being sent and the rest.
        self.max_connections = max(1, min(limits.max_connections,
                                          (open_file_budget() - 64) // 2 - limits.workers))
        self.ready: queue.SimpleQueue = queue.SimpleQueue()
        self.waiting = WaitingRoom(limits, self.dispatch, self.close_client, self.answer_sent)
        self.workers: list[threading.Thread] = []
        super().__init__(address, ChannelRequestHandler)
        self.waiting.start()
        for _ in range(min(2, limits.workers)):
            self.add_worker()

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6 and self.server_address[0] == "::":
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        # HTTPServer.server_bind would ask DNS for our name (getfqdn): slow, and unused.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def token_for(self, client: str, target: str) -> str | None:
        """The token a request from ``client`` must carry: none from this machine when the
        server lets local clients in without it (a request that names a token still has it
        checked)."""
        if (self.token and self.local_clients_without_token and not target.startswith("/t/")
                and is_local_client(client, self.server_address[0])):
            return None
        return self.token

    def process_request(self, request: socket.socket, client_address) -> None:
        """A new connection: into the waiting room, after making room for it if full."""
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        request.setblocking(False)  # for good: no thread ever waits on a client
        client = Client(request, client_address)
        with self.lock:
            self.open_clients.add(client)
            full = len(self.open_clients) > self.max_connections
        if full and not self.waiting.evict_oldest():
            self.close_client(client)  # every connection is busy: this one cannot wait
            return
        self.waiting.park(client)

    def remember_route(self, target: str, path: str) -> None:
        """``target`` names the file at ``path``: later requests for it can be answered
        without a handler. Only targets whose answer does not depend on the client: with a
        token, those that carry it."""
        if self.token is None or target.startswith("/t/"):
            if len(self.routes) > 100_000:
                self.routes.clear()  # a crude bound, as for the file cache
            self.routes[target] = path

    def answer_at_once(self, client: Client) -> bool:
        """Answer the client's first request now, on this thread, if it is a plain GET or
        HEAD of a remembered file whose answer is a 304 or held in memory: a dict lookup,
        a stat and a send. False: a handler on a worker must read it."""
        pending = client.pending
        end = head_length(pending)
        request = plain_request(pending[:end]) if end is not None and end <= MAX_HEAD else None
        if request is None:
            return False
        method, target, tags = request
        path = self.routes.get(target)
        if path is None:
            return False
        try:
            stat = os.stat(path)  # a replaced file has another inode, size or time
        except OSError:
            return False
        facts = self.files.facts.get(path)
        if facts is None or facts.version != _version(stat):
            return False  # a handler reads the new version, checks and caches it
        started = time.perf_counter()
        if tags is not None and (tags == facts.etag.encode() or self._fresh(facts, tags)):
            status, answer, body = 304, facts.fresh_lines, b""
        elif facts.content is not None:
            status, answer = 200, facts.ok_lines
            body = facts.content if method == b"GET" else b""
        elif method == b"HEAD":
            status, answer, body = 200, facts.ok_lines, b""
        else:
            return False  # sent from disk by a worker, which may wait for the disk
        client.pending = pending[end:].lstrip(b"\r\n")
        client.answered = (method.decode(), target, status, len(body), started, False)
        client.close_after = False
        client.send(b"".join((status_head(status), answer, body)))
        return True

    @staticmethod
    def _fresh(facts: FileFacts, tags: bytes) -> bool:
        given = {tag.strip().removeprefix("W/") for tag in str(tags, "latin-1").split(",")}
        return "*" in given or facts.etag in given

    def dispatch(self, client: Client) -> None:
        """Answer a connection whose request has arrived (called by the waiting room, and
        after each answer): plain requests of remembered files at once, the others on a
        worker."""
        try:
            while self.answer_at_once(client):
                if client.sending():
                    self.waiting.park(client)  # the room sends the rest, then comes back
                    return
                self.record(client)
                if not client.has_request():
                    self.waiting.park(client)
                    return
        except OSError:  # reset, or gone
            self.close_client(client)
            return
        self.ready.put(client)
        # The pool grows when requests queue up: a server that sees few starts quickly.
        if self.ready.qsize() > 1 and len(self.workers) < self.limits.workers:
            self.add_worker()

    def add_worker(self) -> None:
        worker = threading.Thread(target=self.work, daemon=True,
                                  name=f"channel-worker-{len(self.workers)}")
        self.workers.append(worker)
        worker.start()

    def work(self) -> None:
        while (client := self.ready.get()) is not None:
            self.serve(client)

    def serve(self, client: Client) -> None:
        """Answer the requests ``client`` has sent, then hand it back to the waiting room."""
        try:
            while True:
                handler = self.RequestHandlerClass(client, client.address, self)
                self.record(client)
                if handler.close_connection or client.sending() or not client.has_request():
                    break
        except OSError:  # reset, or gone: nothing to log
            self.close_client(client)
            return
        except Exception as exc:  # a bug: one line, no traceback
            self.write_log(f"{client.address[0]} error: {type(exc).__name__}: {exc}")
            self.close_client(client)
            return
        client.close_after = handler.close_connection
        if client.sending():
            self.waiting.park(client)  # the room sends the rest as the client takes it
        else:
            self.answer_sent(client)

    def answer_sent(self, client: Client) -> None:
        """The whole answer is out: log it, then wait for the next request, or close."""
        self.record(client)
        if not client.close_after:
            if client.has_request():
                self.dispatch(client)
            else:
                self.waiting.park(client)
        elif client.unread_body:  # let the client read the answer, then close
            with suppress(OSError):
                client.sock.shutdown(socket.SHUT_WR)
            client.closing = True
            self.waiting.park(client)
        else:
            self.close_client(client)

    def close_client(self, client: Client) -> None:
        with self.lock:
            if client not in self.open_clients:
                return
            self.open_clients.discard(client)
        self.record(client, complete=False)
        client.drop_body()
        with suppress(OSError):
            client.sock.shutdown(socket.SHUT_WR)
        client.sock.close()

    def handle_error(self, request, client_address) -> None:
        error = sys.exc_info()[1]
        self.write_log(f"{client_address[0]} error: {type(error).__name__}: {error}")

    def server_close(self) -> None:
        """Close the port and every connection; wait for the workers to finish."""
        super().server_close()  # also called when binding fails: nothing started then
        self.waiting.stop()  # no more requests for the workers, nor new workers
        for _ in self.workers:
            self.ready.put(None)
        for worker in self.workers:
            worker.join()
        while not self.ready.empty():
            if (client := self.ready.get_nowait()) is not None:
                self.close_client(client)
        with self.lock:
            left = list(self.open_clients)
        for client in left:
            self.close_client(client)

    def record(self, client: Client, complete: bool = True) -> None:
        """Count and log the client's last answer once it is all out, or once its
        connection closed before it was (cut short: counted as far as it went)."""
        if client.answered is None or (complete and client.sending()):
            return
        command, path, status, sent, started, cut_short = client.answered
        client.answered = None
        unsent = client.unsent()  # the answer's end: its body, and its head if that is left
        sent = max(0, sent - unsent)
        cut_short = cut_short or unsent > 0
        with self.lock:
            self.requests_served += 1
            self.bytes_sent += sent
        if self.log is not None:
            self.log.request(client.address[0], command, path, status, sent,
                             time.perf_counter() - started, cut_short)

    def write_log(self, line: str) -> None:
        if self.log is not None:
            self.log.message(line)


@dataclass
class ServedChannel:
    """A running channel server: where clients find it, and what it has sent so far."""

    url: str
    host: str
    port: int
    token: str | None
    channel_dir: Path
    _server: ChannelServer = field(repr=False)
    note: str = ""
    local_clients_without_token: bool = False

    @property
    def requests_served(self) -> int:
        return self._server.requests_served

    @property
    def bytes_sent(self) -> int:
        """Body bytes sent (files, ranges, short status texts), not headers."""
        return self._server.bytes_sent

    @property
    def local_url(self) -> str:
        """The URL for clients on this machine: loopback when bound to every address, so
        it does not depend on the machine's name resolving; without the token when the
        server lets local clients in without it."""
        base = f"http://{url_host(local_address(self.host))}:{self.port}/"
        if self.local_clients_without_token or not self.token:
            return base
        return f"{base}t/{self.token}/"

    def describe(self) -> str:
        return f"{self.url} ({self.note})" if self.note else self.url


@contextmanager
def served_channel(channel_dir: Path, *, host: str = "127.0.0.1", port: int = 8000,
                   token: str | None = None, access_log: Path | TextIO | None = None,
                   limits: ConnectionLimits = ConnectionLimits(),
                   local_clients_without_token: bool = False) -> Iterator[ServedChannel]:
    """Serve ``channel_dir`` on ``host:port`` (0: a free port) while the block runs.

    ``local_clients_without_token``: clients on this machine (loopback, or the address the
    server binds) need no token; everyone else does.
    """
    root = _channel_root(channel_dir)
    _check_token(token)
    with ExitStack() as stack:
        log = _open_access_log(stack, access_log, token)
        server = _bind(host, port, root, token, log, limits, local_clients_without_token)
        served = _describe(server, host, root, token)
        served.local_clients_without_token = local_clients_without_token
        _serve_on_thread(stack, server, served)
        yield served


def _channel_root(channel_dir: Path) -> Path:
    root = Path(channel_dir).resolve()
    if not root.is_dir():
        raise HubworksError(f"Channel directory {root} does not exist.",
                            fix="run `doit index_channel`, or point [channel] dir "
                                "(HUBWORKS_CHANNEL_DIR) at the channel")
    return root


def _check_token(token: str | None) -> None:
    if token is not None and not TOKEN_PATTERN.fullmatch(token):
        raise HubworksError(f"Channel token {token!r} cannot stand in a URL path.",
                            fix="use letters, digits and . _ ~ - only, or token = \"auto\"")


def _open_access_log(stack: ExitStack, access_log: Path | TextIO | None,
                     token: str | None) -> AccessLog | None:
    """The access log on a stream, or appended to a file, closed when ``stack`` closes."""
    if access_log is None:
        return None
    stream = access_log
    if isinstance(access_log, (str, Path)):
        stream = stack.enter_context(open(access_log, "a", encoding="utf-8"))
    log = AccessLog(stream, token)
    stack.callback(log.close)
    return log


def _serve_on_thread(stack: ExitStack, server: ChannelServer, served: ServedChannel) -> None:
    """Run ``server`` on a thread until ``stack`` closes: then stop it, close the port and
    every connection, and write the last log line, in that order."""
    # Start and stop lines let a reader of the log see each server's lifetime.
    stack.callback(lambda: server.write_log(
        f"stopped serving {served.url} after {served.requests_served} requests"))
    stack.callback(server.server_close)
    # shutdown() waits up to one poll interval: 20 ms keeps stopping quick and idle cheap.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02},
                              name=f"channel-server-{server.server_port}", daemon=True)
    thread.start()
    stack.callback(thread.join)
    stack.callback(server.shutdown)
    server.write_log(f"serving {served.channel_dir} at {served.url}")


def _bind(host: str, port: int, root: Path, token: str | None, log: AccessLog | None,
          limits: ConnectionLimits, local_clients_without_token: bool) -> ChannelServer:
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if not hasattr(select, "epoll"):
        raise HubworksError(f"Channel server cannot listen on {address}: it needs Linux "
                            f"(it watches its connections with epoll).",
                            fix="serve the channel from a Linux machine, VM or container")
    try:
        return ChannelServer((host, port), root, token, log, limits, local_clients_without_token)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise HubworksError(
                f"Channel server cannot listen on {address}: the port is already in use.",
                fix="stop what listens there, or pick another port with "
                    "HUBWORKS_CHANNEL_PORT=8010 or `[channel] port = 8010` in hubworks.toml "
                    "(port 0 picks a free one)") from None
        raise HubworksError(
            f"Channel server cannot listen on {address}: {exc.strerror or exc}.",
            fix="use an address of this machine with HUBWORKS_CHANNEL_HOST or "
                "`[channel] host` in hubworks.toml (127.0.0.1 by default), and a port "
                "above 1023 unless running as root") from None


def _describe(server: ChannelServer, host: str, root: Path, token: str | None) -> ServedChannel:
    port = server.server_address[1]
    name, note = host, ""
    if listens_everywhere(host):
        # No client can connect to 0.0.0.0 or ::; name the machine instead.
        name = machine_name()
        note = (f"listening on all interfaces ({host or '0.0.0.0'}:{port}); "
                "the URL uses this machine's name")
    url = f"http://{url_host(name)}:{port}/" + (f"t/{token}/" if token else "")
    return ServedChannel(url=url, host=host, port=port, token=token, channel_dir=root,
                         _server=server, note=note)


def is_local_client(client: str, bound_host: str) -> bool:
    """A client on this machine: loopback, or the one address the server binds (a local
    connection to an address of this machine comes from that address)."""
    address = ip_address(client)
    if address is None:
        return False
    return address.is_loopback or (not listens_everywhere(bound_host)
                                   and address == ip_address(bound_host))


def channel_token(policy: str, host: str, *, per_run: bool = False) -> str | None:
    """The path token the [channel] token setting asks for on ``host``.

    ``per_run`` is for the server image builds use: it never takes a fixed token, which
    would outlive the run in build logs and images, but a fresh random one.
    """
    if policy in ("off", ""):
        return None
    if (policy == "auto" or per_run) and is_loopback(host):
        # A loopback server is reachable from this machine only; anything wider gets a token.
        return None
    if policy == "auto" or per_run:
        return secrets.token_urlsafe(24)
    return policy


ACCESS_LOG_NAME = "channel-server.log"
_IN_STATE_DIR: Path = Path()  # marker: the default access log, a file in the state directory


def channel_server_from_settings(settings: Settings, *,
                                 access_log: Path | TextIO | None = _IN_STATE_DIR,
                                 for_builds: bool = False):
    """served_channel() on the configured folder, host, port and token policy.

    ``for_builds``: the server of an image build run, with a per-run token (never the fixed
    one) that clients on this machine need not send. The access log goes to
    logs/channel-server.log under the state directory unless given (None: no log).
    """
    if access_log is _IN_STATE_DIR:
        access_log = log_path(settings, ACCESS_LOG_NAME)
    host = settings.channel.host
    return served_channel(settings.channel_dir, host=host, port=settings.channel.port,
                          token=channel_token(settings.channel.token, host, per_run=for_builds),
                          access_log=access_log, local_clients_without_token=for_builds)


def printable_url(settings: Settings, channel: ServedChannel) -> str:
    """The served URL as serve_channel prints it: a fixed token (channel.token) is never
    printed; a per-run one is, as it is the only way to learn it and dies with the server."""
    shown = channel.describe()
    if channel.token and channel.token == settings.channel.token:
        shown = shown.replace(f"/t/{channel.token}/", "/t/<channel.token>/")
    return shown


@reports_errors
def serve_until_interrupted(settings: Settings) -> None:
    log = sys.__stderr__ or sys.stderr  # past doit's capture: one line per request, live
    with channel_server_from_settings(settings, access_log=log) as channel:
        try:  # from the first line printed: a stop signal may come as soon as it is read
            print_line(f"Serving {channel.channel_dir} at {printable_url(settings, channel)}")
            public = settings.channel.public_url
            if public and public.rstrip("/") != channel.url.rstrip("/"):
                print_line(f"Public URL: {public}")
            print_line("Press Ctrl-C to stop.")
            threading.Event().wait()
        except KeyboardInterrupt:
            print_line(f"Stopping the channel server ({channel.requests_served} requests, "
                       f"{channel.bytes_sent} bytes sent).")
            raise  # the run ends as an interrupted one: status 130, as for every task

