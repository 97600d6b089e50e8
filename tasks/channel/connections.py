"""Connections that cost no thread while they wait, for the channel server.

A ``WaitingRoom`` holds every open connection between requests: one thread watches them
with epoll, reads what clients send until a whole request (headers and a small body) is
in, and only then hands the connection to a worker. What a client does not take at once
of an answer waits in its ``Client`` and goes out as the client takes it. So neither a
client that sends slowly nor one that reads slowly holds a thread, and the
``ConnectionLimits`` bound what a server holds: open connections, idle time, header time
and send time.
"""

from __future__ import annotations

import errno
import os
import re
import select
import socket
import threading
import time
from collections import OrderedDict
from contextlib import suppress
from dataclasses import dataclass
from typing import BinaryIO, Callable

SMALL_BODY = 64 * 1024  # a request body up to this size is read and dropped; larger: close
MAX_HEAD = 64 * 1024  # request line and headers
_CONTENT_LENGTH = re.compile(rb"\ncontent-length[ \t]*:[ \t]*([^\r\n]*)")
_HEAD_END = re.compile(rb"\n\r?\n")  # the first empty line, whichever line ending it has


def head_length(data: bytes) -> int | None:
    """Bytes of the request line and headers at the start of ``data``, blank line included;
    None: the blank line has not arrived. A line ends at LF, with or without a CR before it,
    the rule the handler reads lines by, so both agree on where every request ends."""
    match = _HEAD_END.search(data)
    return None if match is None else match.end()


def head_too_large(data: bytes) -> bool:
    """The request head at the start of ``data`` is, or is bound to be, over MAX_HEAD."""
    end = head_length(data)
    return (len(data) if end is None else end) > MAX_HEAD


def request_length(data: bytes) -> int | None:
    """Bytes of the first whole request in ``data``: its headers and, if it has one, its
    small body. None: not all of it is here yet.

    A body the server will not read (chunked, larger than SMALL_BODY, announced with
    ``Expect: 100-continue``, or with an unclear length) is not counted: the handler
    answers the headers, then closes the connection.
    """
    end = head_length(data)
    if end is None:
        return None
    head = data[:end].lower()
    if b"\ncontent-length" not in head:
        return end
    lengths = _CONTENT_LENGTH.findall(head)
    if (len(lengths) != 1 or b"\ntransfer-encoding" in head or b"\nexpect" in head
            or not lengths[0].strip().isdigit() or len(lengths[0]) > 12):
        return end
    length = int(lengths[0])
    if length > SMALL_BODY:
        return end
    return end + length if len(data) >= end + length else None


@dataclass(frozen=True)
class ConnectionLimits:
    """What one channel server holds for its clients, and for how long."""

    max_connections: int = 1000  # open at once; at the cap the longest idle one is closed
    idle_seconds: float = 30.0  # a keep-alive connection with no request in that time closes
    header_seconds: float = 10.0  # from a request's first byte to its last header (slowloris)
    send_seconds: float = 60.0  # a client that takes none of its answer in that time
    workers: int = 8  # threads answering requests; they wait for disks, never for clients


def open_file_budget() -> int:
    """Open files this process may hold, after raising its soft limit to the hard one."""
    try:
        import resource
    except ImportError:  # not a POSIX system: assume the common default
        return 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return wanted
    with suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        return wanted
    return soft


class Client:
    """One open connection: its socket, the bytes received and not yet answered, what of
    an answer the client has not taken yet, and the times the waiting room judges it by.

    The socket never blocks: ``send`` and ``send_file`` give the kernel what it takes now
    and keep the rest (``outbox``, then ``body``) for ``send_rest``, which the waiting room
    calls whenever the client can take more.
    """

    __slots__ = ("sock", "fd", "address", "pending", "waiting_since", "request_started",
                 "unread_body", "closing", "outbox", "body", "answered", "close_after")

    def __init__(self, sock: socket.socket, address: tuple):
        self.sock, self.fd, self.address = sock, sock.fileno(), address
        self.pending = b""
        self.waiting_since = time.monotonic()
        self.request_started: float | None = None
        self.unread_body = False  # the last request's body was left unread: close after
        self.closing = False  # answered for the last time; what the client still sends is dropped
        self.outbox = b""  # answer bytes the client has not taken yet
        self.body: list[int] | None = None  # [file descriptor, offset, bytes left] to send
        self.answered: tuple | None = None  # the last answer, for the log line
        self.close_after = False  # close once the answer is out

    def send(self, data: bytes) -> None:
        if not self.outbox and self.body is None:
            view = memoryview(data)
            with suppress(BlockingIOError):
                while view:
                    view = view[self.sock.send(view):]
            data = bytes(view)
        self.outbox += data

    def send_file(self, file: BinaryIO, offset: int, count: int) -> None:
        """Send ``count`` bytes of ``file`` from ``offset``: what the client takes now, and
        a duplicate of the file descriptor for the rest."""
        self.body = [os.dup(file.fileno()), offset, count]
        if not self.outbox:
            self.send_rest()

    def sending(self) -> bool:
        return bool(self.outbox) or self.body is not None

    def unsent(self) -> int:
        """Bytes of the answer the client has not taken yet."""
        return len(self.outbox) + (self.body[2] if self.body is not None else 0)

    def send_rest(self) -> bool:
        """Send what the client can take now; True when the answer is all out. OSError
        when the client is gone, or the file shrank below the length announced."""
        with suppress(BlockingIOError):
            while self.outbox:
                self.outbox = self.outbox[self.sock.send(self.outbox):]
            while self.body is not None:
                fd, offset, left = self.body
                sent = os.sendfile(self.fd, fd, offset, min(left, 1 << 24))
                if sent == 0:
                    raise OSError(errno.EIO, "the file shrank while being sent")
                self.body[1:] = offset + sent, left - sent
                if left == sent:
                    self.drop_body()
        return not self.sending()

    def drop_body(self) -> None:
        if self.body is not None:
            os.close(self.body[0])
            self.body = None

    def take_request(self) -> bytes | None:
        """The first whole request received (the waiting room made sure there is one), or
        None for a head over MAX_HEAD: refused, with everything received after it."""
        if head_too_large(self.pending):
            self.pending = b""
            return None
        length = request_length(self.pending) or 0
        # Empty lines between requests are allowed (RFC 9112, 2.2): the next starts after.
        request, self.pending = self.pending[:length], self.pending[length:].lstrip(b"\r\n")
        return request

    def has_request(self) -> bool:
        """Something for a worker: a whole request, or a head too large to wait for."""
        return request_length(self.pending) is not None or head_too_large(self.pending)


class WaitingRoom:
    """The open connections that wait for a request, watched by one thread (epoll).

    A connection leaves the room for a worker once a whole request has arrived, and comes
    back after the answer, or with the part of the answer its client did not take at once,
    which the room sends as the client takes it. The room closes connections idle longer
    than idle_seconds, requests whose headers take longer than header_seconds, clients
    that take nothing for send_seconds, and answered connections whose client still sends
    after a short drain.
    """

    DRAIN_SECONDS = 2.0  # lets a client read an answer before unread request bytes reset it
    _WATCH = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLONESHOT
    _WATCH_SENDING = select.EPOLLOUT | select.EPOLLONESHOT

    def __init__(self, limits: ConnectionLimits, ready: Callable[[Client], None],
                 close: Callable[[Client], None], sent: Callable[[Client], None]):
        self.limits, self.ready, self.close, self.sent = limits, ready, close, sent
        self.clients: OrderedDict[int, Client] = OrderedDict()  # longest waiting first
        self.lock = threading.Lock()
        self.epoll = select.epoll()
        self.wake_read, self.wake_write = os.pipe()
        self.epoll.register(self.wake_read, select.EPOLLIN)
        self.sweep_every = max(0.05, min(1.0, limits.idle_seconds / 4, limits.header_seconds / 4))
        self.stopping = False
        self.thread = threading.Thread(target=self.run, name="channel-waiting-room", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def park(self, client: Client) -> None:
        """Watch ``client`` for its next request, or until it takes the rest of an answer."""
        client.waiting_since = time.monotonic()
        watch = self._WATCH_SENDING if client.sending() else self._WATCH
        with self.lock:
            if self.stopping:
                self.close(client)
                return
            self.clients[client.fd] = client
            try:
                self.epoll.modify(client.fd, watch)
            except FileNotFoundError:
                self.epoll.register(client.fd, watch)

    def evict_oldest(self) -> bool:
        """Close the connection that has waited longest for its next request, to make room
        for a new one; never one still taking an answer. False: none waits for a request."""
        with self.lock:
            for fd, client in self.clients.items():  # in the order they came to wait
                if not client.sending() and not client.closing:
                    del self.clients[fd]
                    break
            else:
                return False
        self.close(client)
        return True

    def run(self) -> None:
        next_sweep = time.monotonic() + self.sweep_every
        while not self.stopping:
            for fd, _ in self.epoll.poll(self.sweep_every):
                if fd == self.wake_read:
                    continue
                with self.lock:
                    client = self.clients.get(fd)
                if client is not None:
                    self.receive(client)
            if time.monotonic() >= next_sweep:
                self.sweep()
                next_sweep = time.monotonic() + self.sweep_every

    def receive(self, client: Client) -> None:
        if client.sending():
            self.send_rest(client)
            return
        try:
            data = client.sock.recv(65536)
        except BlockingIOError:
            data = None
        except OSError:  # reset by the client, or closed to make room meanwhile
            data = b""
        if data == b"":
            self.leave(client) and self.close(client)
            return
        if data and not client.closing:
            if not client.pending:
                data = data.lstrip(b"\r\n")  # blank lines before a request are allowed
                client.request_started = time.monotonic()
            client.pending += data
            if client.has_request():  # a head too large goes too: it gets its 431
                if self.leave(client):
                    self.ready(client)
                return
        with self.lock:
            if self.clients.get(client.fd) is client:
                self.epoll.modify(client.fd, self._WATCH)

    def send_rest(self, client: Client) -> None:
        try:
            done = client.send_rest()
        except OSError:
            self.leave(client) and self.close(client)
            return
        if done:
            if self.leave(client):
                self.sent(client)
            return
        client.waiting_since = time.monotonic()  # it took some: its send time starts again
        with self.lock:
            if self.clients.get(client.fd) is client:
                self.epoll.modify(client.fd, self._WATCH_SENDING)

    def leave(self, client: Client) -> bool:
        """Take ``client`` out of the room; False if it was no longer there."""
        with self.lock:
            if self.clients.get(client.fd) is not client:
                return False
            del self.clients[client.fd]
            return True

    def sweep(self) -> None:
        now = time.monotonic()
        limits = self.limits
        with self.lock:
            expired = [client for client in self.clients.values()
                       if (client.closing and now - client.waiting_since > self.DRAIN_SECONDS)
                       or (now - client.waiting_since > limits.send_seconds
                           if client.sending() else
                           (client.pending and now - client.request_started
                            > limits.header_seconds)
                           or now - client.waiting_since > limits.idle_seconds)]
            for client in expired:
                del self.clients[client.fd]
        for client in expired:
            self.close(client)

    def stop(self) -> None:
        self.stopping = True
        os.write(self.wake_write, b"x")
        if self.thread.ident is not None:
            self.thread.join()
        with self.lock:
            left = list(self.clients.values())
            self.clients.clear()
        for client in left:
            self.close(client)
        self.epoll.close()
        os.close(self.wake_read)
        os.close(self.wake_write)


class ClientWriter:
    """``wfile`` for a handler: writes go to the client without waiting (Client.send)."""

    def __init__(self, client: Client):
        self.client = client

    def write(self, data: bytes) -> int:
        self.client.send(data)
        return len(data)

    def flush(self) -> None:
        pass
