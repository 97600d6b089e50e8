"""The channel server, over real HTTP: what conda clients and browsers get, and what nobody gets.

A channel is built here from two tiny recipes (rattler-build, offline), indexed with rattler,
served on a free port, and installed from with py-rattler.
"""

from __future__ import annotations

import asyncio
import bz2
import http.client
import io
import os
import re
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from contextlib import nullcontext
from email.utils import formatdate
from pathlib import Path

import pytest
import rattler
import requests
from rattler import Gateway, SourceConfig
from rattler.index import index_fs
from rattler_build import Stage0Recipe

from tasks.channel.connections import MAX_HEAD
from tasks.channel.server import (SMALL_FILE, ConnectionLimits, channel_server_from_settings,
                                  channel_token, printable_url, served_channel)
from tasks.core.errors import HubworksError
from tasks.core.netaddr import machine_name
from tasks.core.settings import load_settings
from tests.conftest import DODO, Workspace, port_refuses

IMMUTABLE = "public, max-age=31536000, immutable"


def recipe(name: str, version: str, *run: str) -> str:
    """A noarch: generic recipe that installs share/<name>/<name>.txt."""
    folder = f"$PREFIX/share/{name}"
    text = (f'package: {{name: {name}, version: "{version}"}}\n'
            "build:\n  noarch: generic\n  script:\n"
            f"    - mkdir -p {folder} && echo {name} > {folder}/{name}.txt\n")
    if run:
        text += "requirements:\n  run:\n" + "".join(f"    - {spec}\n" for spec in run)
    return text


def build_into(channel: Path, build: Path, name: str, version: str, *run: str) -> None:
    """Build the recipe with rattler-build (offline: only local dependencies), copy it in."""
    path = build.parent / "recipes" / name / "recipe.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(recipe(name, version, *run))
    Stage0Recipe.from_file(path).run_build(output_dir=build, channels=[build.as_uri()])
    (channel / "noarch").mkdir(parents=True, exist_ok=True)
    shutil.copy(next((build / "noarch").glob(f"{name}-{version}-*.conda")), channel / "noarch")


@pytest.fixture(scope="module")
def channel(tmp_path_factory) -> Path:
    """An indexed channel of hw-app and its dependency hw-dep, plus files for the edge cases."""
    base = tmp_path_factory.mktemp("served")
    channel = base / "channel"
    build_into(channel, base / "build", "hw-dep", "1.0.0")
    build_into(channel, base / "build", "hw-app", "2.0.0", "hw-dep >=1")
    asyncio.run(index_fs(channel))

    (channel / "index.html").write_text("<h1>channel</h1>")
    (channel / "noarch" / "index.html").write_text("<h1>noarch</h1>")
    (channel / "noarch" / "repodata.json.bz2").write_bytes(
        bz2.compress((channel / "noarch" / "repodata.json").read_bytes()))
    (channel / "noarch" / "old-1.0-0.tar.bz2").write_bytes(b"not really a package")
    (channel / "bytes.bin").write_bytes(bytes(range(256)) * 4)
    (channel / "big.bin").write_bytes(os.urandom(8 << 20))
    (channel / "changing.json").write_text("{}")
    (channel / "no-index").mkdir()
    (channel / "no-index" / "file.txt").write_text("listed nowhere")
    (base / "secret.txt").write_text("SECRET outside the channel")
    (channel / "noarch" / "leak.txt").symlink_to(base / "secret.txt")
    (channel / "outside").symlink_to(base)
    # A sibling whose name starts with the channel's: inside by a careless prefix test only.
    (base / "channel-private" / "secret").mkdir(parents=True)
    (base / "channel-private" / "secret" / "key.txt").write_text("SECRET next to the channel")
    (channel / "private").symlink_to("../channel-private/secret")
    (channel / "private-key.txt").symlink_to("../channel-private/secret/key.txt")
    (channel / "latest.json").symlink_to(channel / "noarch" / "repodata.json")
    return channel


@pytest.fixture(scope="module")
def server(channel):
    with served_channel(channel, port=0) as served:
        yield served


def raw_get(port: int, target: str) -> tuple[int, bytes]:
    """Send the request line exactly as written (requests and http.client tidy paths)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                     .encode("latin-1"))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def read_to_end(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (a timeout fails the test)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


# What conda clients need ------------------------------------------------------------------

@pytest.mark.parametrize("path, content_type, cache_control", [
    ("noarch/repodata.json", "application/json", "no-cache"),
    ("noarch/repodata.json.zst", "application/zstd", "no-cache"),
    ("noarch/repodata.json.bz2", "application/x-bzip2", "no-cache"),
    ("noarch/repodata_shards.msgpack.zst", "application/zstd", "no-cache"),
    ("noarch/shards/*.msgpack.zst", "application/zstd", IMMUTABLE),
    ("noarch/hw-app-2.0.0-*.conda", "application/octet-stream", IMMUTABLE),
    ("noarch/old-1.0-0.tar.bz2", "application/x-tar", IMMUTABLE),
    ("index.html", "text/html; charset=utf-8", "no-cache"),
])
def test_each_file_kind_gets_its_type_caching_and_validators(server, channel, path,
                                                             content_type, cache_control):
    local = next(channel.glob(path))
    answer = requests.get(server.url + local.relative_to(channel).as_posix())
    assert answer.status_code == 200
    assert answer.content == local.read_bytes()
    assert answer.headers["Content-Type"] == content_type
    assert answer.headers["Cache-Control"] == cache_control
    assert answer.headers["Content-Length"] == str(local.stat().st_size)
    assert answer.headers["ETag"].startswith('"')
    assert answer.headers["Last-Modified"].endswith("GMT")


def test_revalidation_answers_304_with_etag_and_last_modified(server, channel):
    url = server.url + "changing.json"
    first = requests.get(url)
    etag, modified = first.headers["ETag"], first.headers["Last-Modified"]

    for condition in ({"If-None-Match": etag}, {"If-None-Match": f'"other", W/{etag}'},
                      {"If-Modified-Since": modified}):
        again = requests.get(url, headers=condition)
        assert again.status_code == 304, condition
        assert again.content == b"" and "Content-Length" not in again.headers
        # rattler rejects a 304 that lacks these (rattler issue 2719)
        assert (again.headers["ETag"], again.headers["Last-Modified"]) == (etag, modified)
        assert again.headers["Cache-Control"] == "no-cache"

    # If-None-Match decides when both are sent
    stale = {"If-None-Match": '"other"', "If-Modified-Since": modified}
    assert requests.get(url, headers=stale).status_code == 200
    older = formatdate(time.time() - 86400 * 365, usegmt=True)
    assert requests.get(url, headers={"If-Modified-Since": older}).status_code == 200

    later = time.time() + 5
    os.utime(channel / "changing.json", (later, later))
    changed = requests.get(url, headers={"If-None-Match": etag})
    assert changed.status_code == 200
    assert changed.headers["ETag"] != etag


def test_two_requests_share_one_keep_alive_connection(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    connection.request("GET", "/noarch/repodata.json")
    first = connection.getresponse()
    first.read()
    sock = connection.sock
    connection.request("HEAD", "/noarch/repodata.json")
    second = connection.getresponse()
    assert (first.version, first.status, second.status) == (11, 200, 200)
    assert connection.sock is sock and first.getheader("Connection") is None
    connection.close()


def test_repeat_requests_get_the_same_answer_and_see_the_file_change(server, channel):
    """After a handler read a file once, plain requests for it are answered from what it
    kept: the same headers, and a file replaced or removed under its name is seen at once."""
    path = channel / "repeated.json"
    path.write_bytes(b'{"version": 1}')
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)

    def get(headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
        connection.request("GET", "/repeated.json", headers=headers or {})
        answer = connection.getresponse()
        answer.body = answer.read()
        return answer

    first, second = get(), get()
    assert (first.body, second.body) == (b'{"version": 1}',) * 2
    assert [h for h in first.getheaders() if h[0] != "Date"] == \
        [h for h in second.getheaders() if h[0] != "Date"]
    for _ in range(2):
        fresh = get({"If-None-Match": first.getheader("ETag")})
        assert (fresh.status, fresh.body, fresh.getheader("ETag")) == \
            (304, b"", first.getheader("ETag"))

    replacement = channel / "repeated.json.new"
    replacement.write_bytes(b'{"version": 2}')
    os.replace(replacement, path)
    changed = get({"If-None-Match": first.getheader("ETag")})
    assert (changed.status, changed.body) == (200, b'{"version": 2}')
    path.unlink()
    assert get().status == 404
    connection.close()


def test_head_sends_headers_without_a_body(server, channel):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    connection.request("HEAD", "/bytes.bin")
    head = connection.getresponse()
    assert head.read() == b""
    assert head.getheader("Content-Length") == "1024"
    # a stray body would be read as the next response's status line
    connection.request("GET", "/bytes.bin")
    assert connection.getresponse().read() == (channel / "bytes.bin").read_bytes()
    connection.close()


def test_byte_ranges(server, channel):
    url, data = server.url + "bytes.bin", (channel / "bytes.bin").read_bytes()
    etag = requests.head(url).headers["ETag"]

    for header, first, last in [("bytes=10-19", 10, 19), ("bytes=-5", 1019, 1023),
                                ("bytes=1000-", 1000, 1023), ("bytes=1020-5000", 1020, 1023)]:
        part = requests.get(url, headers={"Range": header})
        assert part.status_code == 206, header
        assert part.headers["Content-Range"] == f"bytes {first}-{last}/1024"
        assert part.content == data[first:last + 1]

    past_end = requests.get(url, headers={"Range": "bytes=1024-"})
    assert past_end.status_code == 416
    assert past_end.headers["Content-Range"] == "bytes */1024"

    several = requests.get(url, headers={"Range": "bytes=0-1,5-6"})
    assert (several.status_code, several.content) == (200, data)
    same = requests.get(url, headers={"Range": "bytes=0-3", "If-Range": etag})
    assert same.status_code == 206
    changed = requests.get(url, headers={"Range": "bytes=0-3", "If-Range": '"old"'})
    assert (changed.status_code, changed.content) == (200, data)


def test_byte_ranges_of_a_file_sent_from_disk(server, channel):
    data = (channel / "big.bin").read_bytes()
    size, middle = len(data), len(data) // 2
    assert size > SMALL_FILE  # sent with sendfile, not from memory
    session = requests.Session()  # one connection: a byte too many would garble the next
    for header, first, last in [("bytes=0-0", 0, 0),
                                (f"bytes={middle}-{middle + 99_999}", middle, middle + 99_999),
                                ("bytes=-70000", size - 70_000, size - 1),
                                (f"bytes={size - 1}-{size - 1}", size - 1, size - 1)]:
        part = session.get(server.url + "big.bin", headers={"Range": header})
        assert part.status_code == 206, header
        assert part.headers["Content-Range"] == f"bytes {first}-{last}/{size}"
        assert part.headers["Content-Length"] == str(last - first + 1)
        assert part.content == data[first:last + 1], header
    assert session.get(server.url + "index.html").text == "<h1>channel</h1>"
    session.close()


@pytest.mark.parametrize("header, status, content_range", [
    ("bytes=1-" + "9" * 5000, 206, "bytes 1-1023/1024"),  # past the end: up to the end
    ("bytes=-" + "9" * 5000, 206, "bytes 0-1023/1024"),  # more than all: all
    ("bytes=" + "9" * 5000 + "-", 416, "bytes */1024"),
    ("bytes=" + "1" * 40 + "-" + "2" * 40, 416, "bytes */1024"),
])
def test_absurd_range_numbers_get_an_answer_not_a_traceback(server, channel, capfd, header,
                                                             status, content_range):
    answer = requests.get(server.url + "bytes.bin", headers={"Range": header})
    assert (answer.status_code, answer.headers["Content-Range"]) == (status, content_range)
    if status == 206:
        first = int(content_range.split()[1].split("-")[0])
        assert answer.content == (channel / "bytes.bin").read_bytes()[first:]
    assert "Traceback" not in capfd.readouterr().err


# What nobody gets -------------------------------------------------------------------------

@pytest.mark.parametrize("target", [
    "/../secret.txt",
    "/noarch/../../secret.txt",
    "/%2e%2e/secret.txt",
    "/noarch/%2E%2E/%2e%2e/secret.txt",
    "/noarch/..%2f..%2fsecret.txt",
    "/noarch\\..\\..\\secret.txt",
    "/%5c..%5csecret.txt",
    "/noarch/repodata.json%00.txt",
    "/etc/passwd",
    "//etc/passwd",
    "/%2fetc%2fpasswd",
    "http://127.0.0.1/etc/passwd",
    "/noarch/leak.txt",
    "/outside/secret.txt",
    "/private/key.txt",
    "/private-key.txt",
    "/no-index/",
    "/no-index",
    "/noarch/missing.conda",
])
def test_nothing_outside_the_channel_and_no_listings(server, target):
    status, body = raw_get(server.port, target)
    assert status == 404
    assert b"SECRET" not in body and b"root:" not in body


def test_symlinks_within_the_channel_are_served(server, channel):
    answer = requests.get(server.url + "latest.json")
    assert answer.content == (channel / "noarch" / "repodata.json").read_bytes()


def test_folders_serve_their_index_html(server):
    assert requests.get(server.url).text == "<h1>channel</h1>"
    assert requests.get(server.url + "noarch/").text == "<h1>noarch</h1>"
    # the slash keeps the page's relative links inside the folder
    redirect = requests.get(server.url + "noarch", allow_redirects=False)
    assert (redirect.status_code, redirect.headers["Location"]) == (301, "/noarch/")


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_write_methods_are_refused(server, channel, method):
    before = (channel / "changing.json").read_bytes()
    answer = requests.request(method, server.url + "changing.json", data=b"{}")
    assert answer.status_code == 405
    assert answer.headers["Allow"] == "GET, HEAD"
    assert (channel / "changing.json").read_bytes() == before


# A request that a body would smuggle in, were the body read as the next request.
SMUGGLED = b"GET /bytes.bin HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST"])
def test_a_small_body_is_read_and_discarded_not_taken_for_a_request(server, method):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(f"{method} /index.html HTTP/1.1\r\nHost: x\r\n"
                     f"Content-Length: {len(SMUGGLED)}\r\n\r\n".encode() + SMUGGLED
                     + b"GET /noarch/index.html HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answers = read_to_end(sock)
    # two answers: the first request's, then the next request's; none for the body
    status = b"405" if method == "POST" else b"200"
    assert answers.startswith(b"HTTP/1.1 " + status) and answers.count(b"HTTP/1.1 ") == 2
    assert answers.endswith(b"\r\n\r\n<h1>noarch</h1>"), answers


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("framing", [
    f"Content-Length: {1 << 20}",  # larger than is worth reading: only its start is sent
    "Transfer-Encoding: chunked",
])
def test_a_large_or_chunked_body_is_answered_then_the_connection_closed(server, method,
                                                                        framing):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        body = SMUGGLED if framing.startswith("Content") else (
            f"{len(SMUGGLED):x}\r\n".encode() + SMUGGLED + b"\r\n0\r\n\r\n")
        sock.sendall(f"{method} /index.html HTTP/1.1\r\nHost: x\r\n{framing}\r\n\r\n"
                     .encode() + body)
        answers = read_to_end(sock)
    head, _, rest = answers.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    body = b"" if method == "HEAD" else b"<h1>channel</h1>"
    assert rest == body, answers  # one answer, nothing for the body's "request"


NEXT = b"GET /noarch/index.html HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize("first", [
    b"GET /index.html HTTP/1.1\nHost: x\n\n",
    b"GET /index.html HTTP/1.1\r\nHost: x\n\r\n",
    b"GET /index.html HTTP/1.1\nHost: x\r\n\n",
], ids=["lf", "crlf-then-lf", "lf-then-crlf"])
def test_a_request_in_bare_lf_lines_is_answered_and_so_is_the_next(server, first):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(first + NEXT)
        answers = read_to_end(sock)
    assert answers.startswith(b"HTTP/1.1 200 ") and answers.count(b"HTTP/1.1 200 ") == 2
    assert answers.endswith(b"\r\n\r\n<h1>noarch</h1>"), answers


@pytest.mark.parametrize("then", [b"", NEXT], ids=["alone", "then-another"])
def test_a_bare_lf_request_with_a_body_is_answered_at_once(server, then):
    # The body holds an empty CRLF line: the head still ends at the first empty line.
    closing = b"" if then else b"Connection: close\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"POST /index.html HTTP/1.1\nHost: x\n" + closing
                     + f"Content-Length: {len(SMUGGLED)}\n\n".encode() + SMUGGLED + then)
        answers = read_to_end(sock)  # before the header deadline: the socket's timeout is 5 s
    assert answers.startswith(b"HTTP/1.1 405 ")
    assert answers.count(b"HTTP/1.1 ") == (2 if then else 1), answers  # none for the body
    assert answers.endswith(b"<h1>noarch</h1>" if then else b"405 Method Not Allowed\n")


@pytest.mark.parametrize("request_bytes", [
    b"GET /index.html HTTP/2.0\r\nHost: x\r\n\r\n",
    # the preface of HTTP/2 with prior knowledge, and the empty SETTINGS frame after it
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00",
], ids=["request-line", "preface"])
def test_http2_gets_an_http1_505_status_line_and_a_close(server, request_bytes):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(request_bytes)
        answer = read_to_end(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 505 HTTP Version Not Supported", answer
    assert b"Connection: close" in lines
    assert f"Content-Length: {len(body)}".encode() in lines


@pytest.mark.parametrize("method, line", [
    (b"POST", b"Content-Length : 5"), (b"POST", b"Content-Length\t: 5"),
    (b"GET", b"Host : x"),  # a request the reading thread would answer itself
    (b"GET", b"If-None-Match : x"),
])
def test_whitespace_before_a_header_colon_gets_400_naming_the_header(channel, tmp_path,
                                                                     method, line):
    """RFC 9112 5.1: a proxy may read such a line otherwise, so the server must refuse it."""
    log = tmp_path / "access.log"
    with served_channel(channel, port=0, access_log=log) as served:
        # known and cached: a plain GET of it is answered on the reading thread from now on
        assert requests.get(served.url + "index.html").status_code == 200
        with socket.create_connection(("127.0.0.1", served.port), timeout=5) as sock:
            sock.sendall(method + b" /index.html HTTP/1.1\r\nHost: x\r\n" + line
                         + b"\r\n\r\nhello"
                         + b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = read_to_end(sock)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert answer.count(b"HTTP/1.1 ") == 1, answer  # nothing after it is taken as a request
    assert b"\r\nConnection: close\r\n" in answer
    name = line.split(b":")[0].strip().decode()
    assert f"header name '{name}' and its colon" in log.read_text()


def head_of(size: int, ends: bool) -> bytes:
    """A GET for /index.html whose head is ``size`` bytes; ``ends``: with its empty line."""
    start, end = b"GET /index.html HTTP/1.1\r\nHost: x\r\nX-Pad: ", b"\r\n\r\n" if ends else b""
    return start + b"a" * (size - len(start) - len(end)) + end


@pytest.mark.parametrize("size, ends, status", [
    (MAX_HEAD, True, b"200"),
    (MAX_HEAD + 1, True, b"431"),
    (1 << 20, True, b"431"),
    (100_000, False, b"431"),  # a head that never ends is refused all the same
], ids=["at-the-limit", "one-byte-over", "a-megabyte", "never-ending"])
def test_a_request_head_over_the_limit_gets_431_and_a_close(server, size, ends, status):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(head_of(size, ends))
        answer = sock.recv(65536)  # answered while this end still sends, or might
        sock.shutdown(socket.SHUT_WR)
        answer += read_to_end(sock)  # and closed: a keep-alive one would time out here
    assert answer.startswith(b"HTTP/1.1 " + status + b" "), answer[:200]
    if status == b"431":
        assert b"\r\nConnection: close\r\n" in answer


def test_token_guards_every_path_and_stays_out_of_the_log(channel, tmp_path):
    log = tmp_path / "access.log"
    with served_channel(channel, port=0, token="s3cret", access_log=log) as served:
        base = f"http://127.0.0.1:{served.port}/"
        assert served.url == base + "t/s3cret/"
        assert requests.get(served.url + "noarch/repodata.json").status_code == 200
        for path in ["noarch/repodata.json", "t/wrong/noarch/repodata.json", "t/", "t/s3cre/",
                     "t/s3cret2/noarch/repodata.json", "x/s3cret/noarch/repodata.json"]:
            assert requests.get(base + path).status_code == 403, path
    lines = log.read_text().splitlines()
    assert lines[0].split(" ", 1)[1] == f"serving {channel.resolve()} at {base}t/<token>/"
    assert lines[-1].split(" ", 1)[1] == f"stopped serving {base}t/<token>/ after 7 requests"
    assert len(lines) == 9  # start, one line per request, stop
    stamp, client, method, path, status, sent, ms = lines[1].split()
    assert (client, method, path, status) == (
        "127.0.0.1", "GET", "/t/<token>/noarch/repodata.json", "200")
    assert int(sent) == (channel / "noarch" / "repodata.json").stat().st_size
    assert ms.endswith("ms")
    assert "s3cre" not in log.read_text()


def test_the_token_root_without_its_slash_redirects_to_it(channel):
    token = "a-token-of-20-chars-"
    with served_channel(channel, port=0, token=token) as served:
        base = f"http://127.0.0.1:{served.port}/t/{token}"
        bare = requests.get(base, allow_redirects=False)
        assert (bare.status_code, bare.headers["Location"]) == (301, f"/t/{token}/")
        followed = requests.get(base)
        assert (followed.url, followed.text) == (base + "/", "<h1>channel</h1>")


def test_token_setting_policy(channel):
    assert channel_token("auto", "127.0.0.1") is None
    assert channel_token("auto", "localhost") is None
    assert len(channel_token("auto", "0.0.0.0")) >= 16
    assert channel_token("auto", "0.0.0.0") != channel_token("auto", "0.0.0.0")
    assert channel_token("off", "0.0.0.0") is None
    assert channel_token("team-token", "127.0.0.1") == "team-token"
    with pytest.raises(HubworksError, match="token"):
        with served_channel(channel, port=0, token="a/b"):
            pass


FIXED_TOKEN = "fixed-token-for-serve-channel"


def this_machines_lan_address() -> str | None:
    """An address of this machine other than loopback (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


def test_image_builds_get_a_per_run_token_and_this_machine_needs_none(channel, tmp_path):
    assert channel_token(FIXED_TOKEN, "0.0.0.0", per_run=True) not in (None, FIXED_TOKEN)
    assert channel_token(FIXED_TOKEN, "127.0.0.1", per_run=True) is None
    assert channel_token("off", "0.0.0.0", per_run=True) is None
    lan = this_machines_lan_address()
    if lan is None:
        pytest.skip("this machine has no address but loopback")
    direct = requests.Session()
    direct.trust_env = False  # no proxy between this machine and itself
    settings = load_settings(tmp_path, environ={
        "HUBWORKS_CHANNEL_DIR": str(channel), "HUBWORKS_CHANNEL_HOST": "0.0.0.0",
        "HUBWORKS_CHANNEL_PORT": "0", "HUBWORKS_CHANNEL_TOKEN": FIXED_TOKEN})
    with channel_server_from_settings(settings, for_builds=True) as served:
        assert served.token and served.token != FIXED_TOKEN
        assert served.local_url == f"http://127.0.0.1:{served.port}/"
        base = f"http://127.0.0.1:{served.port}/"
        assert direct.get(base + "noarch/repodata.json").status_code == 200
        assert direct.get(f"{base}t/{served.token}/noarch/repodata.json").status_code == 200
        assert direct.get(f"{base}t/{FIXED_TOKEN}/noarch/repodata.json").status_code == 403
        # Through the LAN address a client is no longer loopback: the token is required.
        lan_base = f"http://{lan}:{served.port}/"
        assert direct.get(lan_base + "noarch/repodata.json").status_code == 403
        assert direct.get(f"{lan_base}t/{served.token}/noarch/repodata.json").status_code == 200
    # Bound to that one address, this machine's clients come from it: no token needed.
    settings = load_settings(tmp_path, environ={
        "HUBWORKS_CHANNEL_DIR": str(channel), "HUBWORKS_CHANNEL_HOST": lan,
        "HUBWORKS_CHANNEL_PORT": "0"})
    with channel_server_from_settings(settings, for_builds=True) as served:
        assert served.token and served.local_url == f"http://{lan}:{served.port}/"
        assert direct.get(served.local_url + "noarch/repodata.json").status_code == 200


def test_serve_channel_never_prints_a_fixed_token(channel, tmp_path):
    settings = load_settings(tmp_path, environ={
        "HUBWORKS_CHANNEL_DIR": str(channel), "HUBWORKS_CHANNEL_PORT": "0",
        "HUBWORKS_CHANNEL_TOKEN": FIXED_TOKEN})
    with channel_server_from_settings(settings) as served:
        assert served.token == FIXED_TOKEN  # serve_channel's own server uses it
        assert printable_url(settings, served) == \
            f"http://127.0.0.1:{served.port}/t/<channel.token>/"
        answer = requests.get(f"http://127.0.0.1:{served.port}/noarch/repodata.json")
        assert answer.status_code == 403  # from loopback too: its token guards everything


def test_settings_bind_all_interfaces_with_a_token_and_a_reachable_name(channel, tmp_path):
    settings = load_settings(tmp_path, environ={
        "HUBWORKS_CHANNEL_DIR": str(channel), "HUBWORKS_CHANNEL_HOST": "0.0.0.0",
        "HUBWORKS_CHANNEL_PORT": "0"})
    with channel_server_from_settings(settings) as served:
        assert served.token and served.url.endswith(f":{served.port}/t/{served.token}/")
        assert machine_name() in served.url and "all interfaces" in served.note
        local = f"http://127.0.0.1:{served.port}/t/{served.token}/noarch/repodata.json"
        assert requests.get(local).status_code == 200
    logged = (tmp_path / ".hubworks" / "logs" / "channel-server.log").read_text()
    assert "/t/<token>/noarch/repodata.json 200" in logged


# Careless and hostile clients -------------------------------------------------------------

FLOOD = 3000


def open_file_limit(wanted: int) -> None:
    """Raise this process's soft limit on open files to fit ``wanted`` more sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"needs {wanted} open files; the hard limit here is {hard}")
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE,
                           (wanted if hard == resource.RLIM_INFINITY else hard, hard))


def assert_answers(url: str) -> None:
    # the timeout only keeps a stalled server from hanging the test; speed is the benchmark's
    assert requests.get(url, timeout=5).status_code == 200


@pytest.mark.parametrize("flood", ["idle", "slow"])
def test_a_flood_of_idle_or_slow_connections_does_not_hold_up_a_request(channel, flood):
    open_file_limit(2 * FLOOD + 2000)  # both ends of each connection live in this process
    with served_channel(channel, port=0) as served:
        url = served.url + "noarch/repodata.json"
        sockets = []
        try:
            for _ in range(FLOOD):
                sock = socket.create_connection(("127.0.0.1", served.port), timeout=5)
                if flood == "slow":  # a request whose headers never end (slowloris)
                    sock.sendall(b"GET /index.html HTTP/1.1\r\nHost: x\r\nX-Wait: ")
                sockets.append(sock)
            assert_answers(url)
            # the server held no more than its cap: it closed the longest idle ones
            closed = select.poll()
            for sock in sockets:
                closed.register(sock, select.POLLIN)
            assert len(closed.poll(1000)) >= FLOOD - ConnectionLimits().max_connections
        finally:
            for sock in sockets:  # all at once, as a crowd of clients going away
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
        assert_answers(url)


def test_clients_that_stop_reading_their_downloads_do_not_hold_up_a_request(channel):
    with served_channel(channel, port=0) as served:
        stalled = []
        try:
            for _ in range(100):  # more than there are workers
                sock = socket.create_connection(("127.0.0.1", served.port), timeout=5)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.sendall(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
                stalled.append(sock)
            assert_answers(served.url + "index.html")
        finally:
            for sock in stalled:
                sock.close()


def test_a_slow_reader_gets_the_whole_file_and_one_log_line(channel, tmp_path):
    log = tmp_path / "access.log"
    with served_channel(channel, port=0, access_log=log) as served:
        connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=5)
        connection.request("GET", "/big.bin")
        answer = connection.getresponse()
        time.sleep(0.5)  # the socket buffers fill up; the rest waits for the client
        assert answer.read() == (channel / "big.bin").read_bytes()
        connection.request("GET", "/index.html")  # the connection goes on
        assert connection.getresponse().read() == b"<h1>channel</h1>"
        connection.close()
    lines = log.read_text().splitlines()
    assert [line.split()[2:5] for line in lines[1:-1]] == [
        ["GET", "/big.bin", "200"], ["GET", "/index.html", "200"]]
    assert int(lines[1].split()[5]) == 8 << 20


def test_at_the_connection_cap_the_longest_idle_connection_makes_room(channel):
    with served_channel(channel, port=0, limits=ConnectionLimits(max_connections=3)) as served:
        clients = [http.client.HTTPConnection("127.0.0.1", served.port, timeout=5)
                   for _ in range(4)]
        for client in clients:  # one request each, then idle; the first is the oldest
            client.request("GET", "/index.html")
            assert client.getresponse().read() == b"<h1>channel</h1>"
            # a client reads its answer before the worker parks the connection again: let
            # it park, so "idle longest" follows the order of the requests on a busy machine
            time.sleep(0.1)
        assert clients[0].sock.recv(1) == b""  # closed by the server to make room
        for client in clients[1:]:
            client.request("GET", "/noarch/index.html")
            assert client.getresponse().read() == b"<h1>noarch</h1>"
            client.close()
        clients[0].close()


def start_download(port: int, target: str = "/big.bin") -> tuple[socket.socket, bytes]:
    """A client that asks for ``target`` and takes nothing yet but the first bytes (returned
    with it): the rest waits in the server for it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    first = sock.recv(4096)
    assert first.startswith(b"HTTP/1.1 200 ")
    time.sleep(0.3)  # the socket buffers fill up; the worker hands the rest on
    return sock, first


def test_at_the_connection_cap_a_download_in_progress_is_never_the_one_closed(channel,
                                                                             tmp_path):
    log = tmp_path / "access.log"
    data = (channel / "big.bin").read_bytes()
    limits = ConnectionLimits(max_connections=3)
    with served_channel(channel, port=0, access_log=log, limits=limits) as served:
        download, received = start_download(served.port)  # the oldest connection
        idle = [http.client.HTTPConnection("127.0.0.1", served.port, timeout=5)
                for _ in range(3)]
        for client in idle:  # one request each, then idle: the third makes one too many
            client.request("GET", "/index.html")
            assert client.getresponse().read() == b"<h1>channel</h1>"
            time.sleep(0.1)  # parked again before the next one comes (see above)
        assert idle[0].sock.recv(1) == b""  # the longest idle one made room
        download.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)  # now take it all
        while chunk := download.recv(1 << 20):
            received += chunk
            if len(received.partition(b"\r\n\r\n")[2]) >= len(data):
                break
        assert received.partition(b"\r\n\r\n")[2] == data  # the whole file
        download.close()
        for client in idle:
            client.close()
    [line] = [line for line in log.read_text().splitlines() if " /big.bin " in line]
    assert line.split()[4:6] == ["200", str(len(data))] and "cut-short" not in line


def test_an_answer_cut_short_is_marked_in_the_log_and_never_counted_below_zero(channel,
                                                                               tmp_path):
    log = tmp_path / "access.log"
    size = (channel / "big.bin").stat().st_size
    with served_channel(channel, port=0, access_log=log) as served:
        for _ in range(5):  # gone before the first byte: the worker meets a closed socket
            with socket.create_connection(("127.0.0.1", served.port), timeout=5) as sock:
                sock.sendall(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        sock, _ = start_download(served.port)  # gone mid-answer: the waiting room meets it
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        deadline = time.monotonic() + 5
        while served.requests_served < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert 0 <= served.bytes_sent < size
    lines = [line.split() for line in log.read_text().splitlines() if " /big.bin " in line]
    assert len(lines) == 6
    for stamp, client, method, path, status, sent, ms, mark in lines:
        assert (status, mark) == ("200", "cut-short") and 0 <= int(sent) < size


def closed_by_server(sock: socket.socket, drip: bytes = b"", within: float = 3) -> bool:
    """Whether the server closes ``sock`` within a few seconds (sending ``drip`` meanwhile)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            sock.sendall(drip)
            if select.select([sock], [], [], 0.2)[0]:
                return sock.recv(65536) == b""
        except ConnectionError:
            return True
    return False


@pytest.mark.parametrize("answered", [False, True], ids=["new", "after-an-answer"])
def test_an_idle_connection_is_closed_after_the_idle_timeout(channel, answered):
    with served_channel(channel, port=0, limits=ConnectionLimits(idle_seconds=0.5)) as served:
        connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=5)
        connection.connect()
        if answered:
            connection.request("GET", "/index.html")
            assert connection.getresponse().read() == b"<h1>channel</h1>"
        assert closed_by_server(connection.sock)
        connection.close()


def test_headers_sent_drip_by_drip_are_cut_off_at_the_header_deadline(channel):
    limits = ConnectionLimits(header_seconds=0.5)
    with served_channel(channel, port=0, limits=limits) as served:
        with socket.create_connection(("127.0.0.1", served.port), timeout=5) as sock:
            sock.sendall(b"GET /index.html HTTP/1.1\r\n")
            assert closed_by_server(sock, drip=b"X-Drip: 1\r\n")


def test_a_reset_connection_leaves_no_traceback_and_at_most_a_line(channel, tmp_path, capfd):
    log = tmp_path / "access.log"
    with served_channel(channel, port=0, access_log=log) as served:
        for target in ("/index.html", "/big.bin"):  # idle between requests; mid-answer
            sock = socket.create_connection(("127.0.0.1", served.port), timeout=5)
            sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            sock.recv(4096)
            time.sleep(0.2)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            time.sleep(0.3)  # the server meets the reset now
        assert requests.get(served.url + "index.html").status_code == 200
    err = capfd.readouterr().err
    logged = log.read_text()
    assert "Traceback" not in err and "Traceback" not in logged
    assert len(logged.splitlines()) <= 2 + 3 + 2  # start, stop, requests, a line per reset


def test_control_characters_in_requests_are_escaped_in_the_log(channel, tmp_path):
    log = tmp_path / "access.log"
    lines = ["GET /\x1b[2J\x1b[31mred HTTP/1.1", "\x1b]0;title\x07GET / HTTP/1.1",
             "GET /a\rFAKE 200 HTTP/1.1", "GET /\x85\x9b31m\x00 HTTP/1.1", "GET /\x7f HTTP/1.0"]
    with served_channel(channel, port=0, access_log=log) as served:
        for line in lines:
            with socket.create_connection(("127.0.0.1", served.port), timeout=5) as sock:
                sock.sendall(f"{line}\r\nHost: x\r\nConnection: close\r\n\r\n"
                             .encode("latin-1"))
                assert read_to_end(sock).startswith(b"HTTP/1."), line
    logged = log.read_text(encoding="utf-8")
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f]", logged), logged
    assert "/\\x1b[2J\\x1b[31mred" in logged
    stamp = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d ")
    assert all(stamp.match(line) for line in logged.splitlines())  # nothing forged a line


# Lifetime ---------------------------------------------------------------------------------

def test_busy_port_names_the_address_and_the_fix(channel):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(HubworksError) as failure:
            with served_channel(channel, host="127.0.0.1", port=port):
                pass
    message = str(failure.value)
    assert f"127.0.0.1:{port}" in message and "in use" in message
    assert "HUBWORKS_CHANNEL_PORT" in message and "port 0" in message


@pytest.mark.parametrize("ending", [None, RuntimeError, KeyboardInterrupt])
def test_port_closes_when_the_block_ends_however_it_ends(channel, ending):
    started = time.monotonic()
    with pytest.raises(ending) if ending else nullcontext():
        with served_channel(channel, port=0) as served:
            port = served.port
            # an idle keep-alive client must not hold the server open
            idle = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            idle.request("GET", "/index.html")
            idle.getresponse().read()
            if ending:
                raise ending("stop")
    assert port_refuses(port)
    assert time.monotonic() - started < 3
    idle.close()


class ServeChannel:
    """`doit serve_channel` in a workspace, as a user runs it, on a free port."""

    def __init__(self, ws: Workspace):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "doit", "-f", str(DODO), "-d", str(ws.root), "serve_channel"],
            env={**ws.env, "HUBWORKS_CHANNEL_PORT": "0"}, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.printed = line = ""
        try:  # up to the last line before it waits: a signal then finds it serving
            while "Press Ctrl-C to stop." not in line:
                line = self.process.stdout.readline()
                assert line, self.printed + self.process.stderr.read()
                self.printed += line
        except BaseException:
            self.process.kill()
            raise
        self.url = self.printed.split("Serving ")[1].split(" at ")[1].split()[0]

    def repodata(self, subdir: str = "noarch") -> dict:
        response = requests.get(self.url + f"{subdir}/repodata.json")
        assert response.status_code == 200, f"{subdir}/repodata.json is not served"
        return response.json()

    def stop(self, signum: int = signal.SIGINT) -> tuple[str, str]:
        """Ctrl-C (or another signal); what it printed on stdout and stderr."""
        self.process.send_signal(signum)
        out, err = self.process.communicate(timeout=30)
        return self.printed + out, err

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].strip("/"))


@pytest.fixture
def serve_channel():
    """Starts `doit serve_channel` in a workspace; it ends with the test, whatever happens."""
    started: list[ServeChannel] = []

    def start(ws: Workspace) -> ServeChannel:
        started.append(ServeChannel(ws))
        return started[-1]

    yield start
    for serving in started:
        serving.process.kill()
        serving.process.wait()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_doit_serve_channel_indexes_first_prints_the_url_and_stops_on_ctrl_c(
        channel, tmp_path, serve_channel, signum):
    ws = Workspace(tmp_path / "ws")
    listed = ws.doit("list").output
    assert re.search(r"^serve_channel +Serve the channel over HTTP until Ctrl-C", listed, re.M)
    # Packages dropped into channel/ and never indexed: serve_channel indexes them first.
    (ws.channel / "noarch").mkdir()
    for package in (channel / "noarch").glob("*.conda"):
        shutil.copy(package, ws.channel / "noarch")
    assert not (ws.channel / "noarch" / "repodata.json").exists()

    serving = serve_channel(ws)
    records = serving.repodata()["packages.conda"].values()
    assert sorted(r["name"] for r in records) == ["hw-app", "hw-dep"]
    out, err = serving.stop(signum)
    assert serving.process.returncode == 130, out + err  # as every interrupted run
    assert "Stopping the channel server" in out and "Traceback" not in out + err
    assert "GET /noarch/repodata.json 200" in err
    assert port_refuses(serving.port)


def test_an_unreadable_package_does_not_stop_serving_and_is_named_at_the_end(
        channel, tmp_path, serve_channel):
    ws = Workspace(tmp_path / "ws")
    (ws.channel / "noarch").mkdir()
    for package in (channel / "noarch").glob("*.conda"):
        shutil.copy(package, ws.channel / "noarch")
    garbage = ws.channel / "noarch" / "garbage-2.0-0.conda"
    garbage.write_bytes(b"this is not a package")

    serving = serve_channel(ws)
    assert "left out of the index: 1 package file(s)" in serving.printed
    records = serving.repodata()["packages.conda"]
    assert sorted(r["name"] for r in records.values()) == ["hw-app", "hw-dep"]
    out, err = serving.stop()
    assert serving.process.returncode == 130, out + err  # interrupted, and says what it met
    assert "problem: 1 package file(s) in the channel are unreadable" in out
    assert str(garbage) in out.rpartition("problem: ")[2]
    assert "Traceback" not in out + err


# A real conda client ----------------------------------------------------------------------

@pytest.mark.parametrize("token, sharded", [(None, True), ("tok3n", True), (None, False)],
                         ids=["sharded", "token", "repodata-json"])
def test_rattler_solves_installs_and_revalidates_cheaply(channel, tmp_path, token, sharded):
    log = io.StringIO()
    config = SourceConfig(sharded_enabled=sharded)

    async def install(url: str, prefix: Path):
        gateway = Gateway(cache_dir=tmp_path / "repodata-cache", default_config=config)
        records = await rattler.solve(sources=[url], specs=["hw-app"], gateway=gateway,
                                      platforms=["linux-64", "noarch"])
        await rattler.install(records, target_prefix=prefix, cache_dir=tmp_path / "pkgs",
                              show_progress=False)
        return sorted(record.name.normalized for record in records)

    with served_channel(channel, port=0, token=token, access_log=log) as served:
        assert asyncio.run(install(served.url, tmp_path / "first")) == ["hw-app", "hw-dep"]
        first_bytes = served.bytes_sent
        asyncio.run(install(served.url, tmp_path / "second"))
        repeat_bytes = served.bytes_sent - first_bytes

    for prefix in ("first", "second"):
        for name in ("hw-app", "hw-dep"):
            assert (tmp_path / prefix / "share" / name / f"{name}.txt").read_text() == name + "\n"
    requests_made = log.getvalue()
    if sharded:
        assert "/noarch/repodata_shards.msgpack.zst 200" in requests_made
        assert "/noarch/shards/" in requests_made
        assert "/noarch/repodata_shards.msgpack.zst 304" in requests_made
    else:
        assert "/noarch/repodata.json.zst 304" in requests_made
    assert repeat_bytes * 5 < first_bytes, requests_made


def test_a_package_indexed_while_serving_is_visible_on_the_next_run(channel, tmp_path):
    served_dir = tmp_path / "channel"
    (served_dir / "noarch").mkdir(parents=True)
    for package in (channel / "noarch").glob("*.conda"):
        shutil.copy(package, served_dir / "noarch")
    asyncio.run(index_fs(served_dir))

    async def found(url: str) -> list[str]:
        # a new gateway per run: only the on-disk cache carries over, as between two runs
        gateway = Gateway(cache_dir=tmp_path / "repodata-cache")
        records = await gateway.query([url], ["noarch"], ["hw-new"], recursive=False)
        return [f"{record.name.normalized} {record.version}" for record in records[0]]

    with served_channel(served_dir, port=0) as served:
        assert asyncio.run(found(served.url)) == []
        build_into(served_dir, tmp_path / "build", "hw-new", "0.1.0")
        asyncio.run(index_fs(served_dir))
        # no-cache on the shard index: rattler asks again instead of trusting its copy
        assert asyncio.run(found(served.url)) == ["hw-new 0.1.0"]
