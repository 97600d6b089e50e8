"""serve_channel: the conda channel over HTTP, on a thread, for as long as a task needs it.

``served_channel()`` is a context manager around a standard-library ``ThreadingHTTPServer``
that gives conda clients what ``python -m http.server`` does not: HTTP/1.1 keep-alive, a
listen backlog of 128, ETag and Last-Modified on every 200 and 304 (rattler rejects a bare
304), ``Cache-Control`` per file kind, HEAD, single byte ranges and ``sendfile`` downloads.
It serves regular files below the channel directory and nothing else, never lists folders,
refuses write methods, and with a token serves only ``/t/<token>/...`` (the conda token URL
form). Leaving the ``with`` block, by success, error or Ctrl-C, closes the port.

Tokens: ``serve_channel`` uses the ``channel.token`` setting. The server that image builds
share never does: it has no token on loopback, else a fresh random one per run that dies
with it, and lets clients on this machine in without any, so local builds carry none.
"""

from __future__ import annotations

import errno
import hmac
import ipaddress
import os
import re
import secrets
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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO, Iterator, TextIO
from urllib.parse import unquote

from .errors import HubworksError, reports_errors
from .settings import TOKEN_PATTERN, Settings
from .workspace import current_settings, log_path, print_line

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
_WILDCARDS = {"", "0.0.0.0", "::"}


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


class Refusal(Exception):
    """An answer other than the file: a status and the headers that go with it."""

    def __init__(self, status: int, headers: dict[str, str] | None = None):
        super().__init__(status)
        self.status = status
        self.headers = headers or {}


def channel_file(root: Path, token: str | None, target: str) -> Path:
    """The regular file below ``root`` (resolved) that a request target names.

    Raises Refusal: 403 without the token, 404 for anything outside ``root`` or not a
    file, 301 to add the slash a folder with an index.html needs for its relative links.
    """
    path = target.split("?", 1)[0].split("#", 1)[0]
    if not path.startswith("/"):
        raise Refusal(404)  # absolute-form targets are for proxies
    if token is not None:
        parts = path.split("/", 3)
        given = parts[2] if len(parts) > 2 and parts[1] == "t" else ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise Refusal(403)
        path = "/" + (parts[3] if len(parts) > 3 else "")
    name = unquote(path)
    if "\\" in name or "\0" in name:
        raise Refusal(404)
    segments = [s for s in name.split("/") if s not in ("", ".")]
    if ".." in segments:
        raise Refusal(404)
    found = _inside(root, root.joinpath(*segments))
    if found.is_dir():
        found = _inside(root, found / "index.html")
        if not path.endswith("/") and found.is_file():
            raise Refusal(301, {"Location": target.split("?", 1)[0] + "/"})
    if not found.is_file():
        raise Refusal(404)
    return found


def _inside(root: Path, candidate: Path) -> Path:
    """``candidate`` with symlinks resolved, if it exists and stays below ``root``."""
    try:
        real = candidate.resolve(strict=True)
    except (OSError, RuntimeError):
        raise Refusal(404) from None
    if real != root and root not in real.parents:
        raise Refusal(404)
    return real


def byte_range(header: str, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a single range; None means send the whole file.

    Several ranges, or a range we cannot read, get the whole file (RFC 9110 allows it);
    a range that starts past the end raises Refusal(416).
    """
    match = _BYTE_RANGE.fullmatch(header.strip())
    if not match or not (match[1] or match[2]):
        return None
    if match[1]:
        first, last = int(match[1]), int(match[2]) if match[2] else size - 1
    else:  # the last N bytes; the last 0 bytes is no range at all
        first, last = (size - int(match[2]) if int(match[2]) else size), size - 1
    if first >= size:
        raise Refusal(416, {"Content-Range": f"bytes */{size}"})
    if last < first:
        return None
    return max(first, 0), min(last, size - 1)


class ChannelRequestHandler(BaseHTTPRequestHandler):
    """GET and HEAD of channel files; write methods refused with 405."""

    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse one connection per host
    server_version = "hubworks-channel"
    disable_nagle_algorithm = True  # headers and body go out as separate writes
    timeout = 60  # an idle keep-alive connection gives its thread back
    server: ChannelServer

    def handle_one_request(self) -> None:
        self.command, self.path, self.status, self.sent = None, "", None, 0
        started = time.perf_counter()
        super().handle_one_request()
        if self.status is not None:
            self.server.record(self, time.perf_counter() - started)

    def do_GET(self) -> None:
        self.answer(with_body=True)

    def do_HEAD(self) -> None:
        self.answer(with_body=False)

    def do_POST(self) -> None:
        # The unread request body would garble the next request on this connection.
        self.close_connection = True
        self.send_status(405, {"Allow": READ_METHODS, "Connection": "close"})

    do_PUT = do_DELETE = do_PATCH = do_POST

    def answer(self, with_body: bool) -> None:
        try:
            token = self.server.token_for(self.client_address[0], self.path)
            path = channel_file(self.server.root, token, self.path)
            with path.open("rb") as file:
                self.send_file(file, path, with_body)
        except Refusal as refusal:
            self.send_status(refusal.status, refusal.headers, with_body)
        except OSError as exc:
            if self.status is not None:  # the client went away mid-body
                self.close_connection = True
                return
            self.log_error("cannot read %s: %s", self.path, exc)
            self.send_status(404, with_body=with_body)

    def send_file(self, file: BinaryIO, path: Path, with_body: bool) -> None:
        # fstat of the open file: the validators describe the bytes we send, even mid-reindex
        stat = os.fstat(file.fileno())
        size = stat.st_size
        validators = {
            "ETag": f'"{size:x}-{stat.st_mtime_ns:x}"',
            "Last-Modified": formatdate(stat.st_mtime, usegmt=True),
            "Cache-Control": cache_control(path),
        }
        if self.is_fresh(validators["ETag"], stat.st_mtime):
            # No Content-Length: some clients (wrk's parser) would wait for that many bytes.
            self.send_head(304, validators, length=None)
            return
        headers = {**validators, "Content-Type": content_type(path.name),
                   "Accept-Ranges": "bytes"}
        wanted = self.headers.get("Range")
        span = byte_range(wanted, size) if wanted and self.range_applies(validators) else None
        if span is None:
            first, count = 0, size
            self.send_head(200, headers, size)
        else:
            first, count = span[0], span[1] - span[0] + 1
            headers["Content-Range"] = f"bytes {span[0]}-{span[1]}/{size}"
            self.send_head(206, headers, count)
        if with_body and count:
            self.send_bytes(file, first, count)

    def is_fresh(self, etag: str, mtime: float) -> bool:
        """The client's copy is current: If-None-Match decides, else If-Modified-Since."""
        tags = self.headers.get("If-None-Match")
        if tags is not None:
            given = {tag.strip().removeprefix("W/") for tag in tags.split(",")}
            return "*" in given or etag in given
        since = self.headers.get("If-Modified-Since")
        if not since:
            return False
        try:
            when = parsedate_to_datetime(since)
        except (TypeError, ValueError):
            return False
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        return int(mtime) <= when.timestamp()

    def range_applies(self, validators: dict[str, str]) -> bool:
        """If-Range: the range only holds for the version the client names."""
        condition = self.headers.get("If-Range")
        return condition is None or condition.strip() in (validators["ETag"],
                                                          validators["Last-Modified"])

    def send_head(self, status: int, headers: dict[str, str], length: int | None) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()

    def send_bytes(self, file: BinaryIO, first: int, count: int) -> None:
        try:
            self.sent = self.connection.sendfile(file, first, count)
        finally:
            self.sent = self.sent or max(file.tell() - first, 0)

    def send_status(self, status: int, headers: dict[str, str] | None = None,
                    with_body: bool = True) -> None:
        """A short text answer that keeps the connection usable (send_error closes it)."""
        body = f"{status} {HTTPStatus(status).phrase}\n".encode()
        self.send_head(status, {**(headers or {}), "Content-Type": "text/plain; charset=utf-8"},
                       len(body))
        if with_body:
            self.wfile.write(body)
            self.sent = len(body)

    def log_request(self, code="-", size="-") -> None:
        self.status = int(code)  # the server writes one line when the request is done

    def log_message(self, format: str, *args) -> None:
        self.server.write_log(f"{self.client_address[0]} {format % args}")


class ChannelServer(ThreadingHTTPServer):
    """A threading HTTP server over one channel folder, with counters and an access log."""

    daemon_threads = True
    request_queue_size = 128  # bursts of parallel downloads; the default backlog is 5

    def __init__(self, address: tuple[str, int], root: Path, token: str | None,
                 log: TextIO | None, local_clients_without_token: bool = False):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.root, self.token, self.log = root, token, log
        self.local_clients_without_token = local_clients_without_token
        self.requests_served = self.bytes_sent = 0
        self.lock = threading.Lock()
        self.connections: set[socket.socket] = set()
        super().__init__(address, ChannelRequestHandler)

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

    def process_request(self, request, client_address) -> None:
        with self.lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        with self.lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def server_close(self) -> None:
        # Idle keep-alive connections would otherwise hold server_close's thread join.
        with self.lock:
            open_now = list(self.connections)
        for connection in open_now:
            with suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        super().server_close()

    def record(self, handler: ChannelRequestHandler, seconds: float) -> None:
        with self.lock:
            self.requests_served += 1
            self.bytes_sent += handler.sent
        self.write_log(f"{handler.client_address[0]} {handler.command or '-'} "
                       f"{handler.path or '-'} {handler.status} {handler.sent} "
                       f"{seconds * 1000:.1f}ms")

    def write_log(self, line: str) -> None:
        if self.log is None:
            return
        line = redact(line)
        if self.token:  # also where a client put the token somewhere else
            line = line.replace(self.token, "<token>")
        stamp = datetime.now().isoformat(timespec="seconds")
        with self.lock:
            self.log.write(f"{stamp} {line}\n")
            self.log.flush()


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
        path = f"t/{self.token}/" if self.token else ""
        base = self.url.removesuffix(path)
        if self.host in _WILDCARDS:
            base = f"http://127.0.0.1:{self.port}/"
        return base if self.local_clients_without_token else base + path

    def describe(self) -> str:
        return f"{self.url} ({self.note})" if self.note else self.url


@contextmanager
def served_channel(channel_dir: Path, *, host: str = "127.0.0.1", port: int = 8000,
                   token: str | None = None, access_log: Path | TextIO | None = None,
                   local_clients_without_token: bool = False) -> Iterator[ServedChannel]:
    """Serve ``channel_dir`` on ``host:port`` (0: a free port) while the block runs.

    ``local_clients_without_token``: clients on this machine (loopback, or the address the
    server binds) need no token; everyone else does.
    """
    root = Path(channel_dir).resolve()
    if not root.is_dir():
        raise HubworksError(f"Channel directory {root} does not exist.",
                            fix="run `doit index_channel`, or point [channel] dir "
                                "(HUBWORKS_CHANNEL_DIR) at the channel")
    if token is not None and not TOKEN_PATTERN.fullmatch(token):
        raise HubworksError(f"Channel token {token!r} cannot stand in a URL path.",
                            fix="use letters, digits and . _ ~ - only, or token = \"auto\"")
    with ExitStack() as stack:
        log = access_log
        if isinstance(access_log, (str, Path)):
            log = stack.enter_context(open(access_log, "a", encoding="utf-8"))
        server = _bind(host, port, root, token, log, local_clients_without_token)
        stack.callback(server.server_close)
        # shutdown() waits up to one poll interval: 20 ms keeps stopping quick and idle cheap.
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02},
                                  name=f"channel-server-{server.server_port}", daemon=True)
        thread.start()
        stack.callback(thread.join)
        stack.callback(server.shutdown)
        served = _describe(server, host, root, token)
        served.local_clients_without_token = local_clients_without_token
        # Start and stop lines let a reader of the log see each server's lifetime.
        server.write_log(f"serving {root} at {served.url}")
        stack.callback(lambda: server.write_log(
            f"stopped serving {served.url} after {served.requests_served} requests"))
        yield served


def _bind(host: str, port: int, root: Path, token: str | None, log: TextIO | None,
          local_clients_without_token: bool) -> ChannelServer:
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        return ChannelServer((host, port), root, token, log, local_clients_without_token)
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
    if host in _WILDCARDS:
        # No client can connect to 0.0.0.0 or ::; name the machine instead.
        name = machine_name()
        note = (f"listening on all interfaces ({host or '0.0.0.0'}:{port}); "
                "the URL uses this machine's name")
    shown = f"[{name}]" if ":" in name else name
    url = f"http://{shown}:{port}/" + (f"t/{token}/" if token else "")
    return ServedChannel(url=url, host=host, port=port, token=token, channel_dir=root,
                         _server=server, note=note)


def machine_name() -> str:
    """This machine's DNS name, or its host name where DNS only knows it as localhost."""
    fqdn = socket.getfqdn()
    return socket.gethostname() if fqdn.split(".")[0] == "localhost" else fqdn


def _ip_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    # A dual-stack server sees IPv4 clients as ::ffff:a.b.c.d.
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    address = _ip_address(host)
    return bool(address and address.is_loopback)


def is_local_client(client: str, bound_host: str) -> bool:
    """A client on this machine: loopback, or the one address the server binds (a local
    connection to an address of this machine comes from that address)."""
    address = _ip_address(client)
    if address is None:
        return False
    return address.is_loopback or (bound_host not in _WILDCARDS
                                   and address == _ip_address(bound_host))


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
def serve_until_interrupted() -> None:
    settings = current_settings()
    log = sys.__stderr__ or sys.stderr  # past doit's capture: one line per request, live
    with channel_server_from_settings(settings, access_log=log) as channel:
        print_line(f"Serving {channel.channel_dir} at {printable_url(settings, channel)}")
        public = settings.channel.public_url
        if public and public.rstrip("/") != channel.url.rstrip("/"):
            print_line(f"Public URL: {public}")
        print_line("Press Ctrl-C to stop.")
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            print_line(f"Stopping the channel server ({channel.requests_served} requests, "
                       f"{channel.bytes_sent} bytes sent).")


def task_serve_channel():
    """Serve the channel over HTTP until Ctrl-C (prints its URL; access log on stderr)."""
    return {
        "actions": [serve_until_interrupted],
        "task_dep": ["index_channel"],
        "uptodate": [False],
        "verbosity": 2,
    }
