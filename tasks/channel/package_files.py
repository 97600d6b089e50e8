"""Reading a conda package file whole, once: every byte checked, the page's metadata out.

A package file is readable when each of its compressed streams decompresses to its end
(bz2's block and stream checksums; zstd's frames), each tar archive in it walks to its
end with every header's checksum right, and, for ``.conda``, every zip member matches its
CRC-32 and the zip's records agree with each other: damage or truncation anywhere in the
file is caught. ``info/index.json`` and ``info/about.json`` come out of the same pass and
are parsed by rattler's own types, as its indexer parses them.

Decompression and checksums run in C code that releases the interpreter lock (the index
reads many packages in one process per core). The tar walk is a few lines here rather than
``tarfile``, which costs more per member than the decompression of a small package and
takes a damaged header for the end of the archive.
"""

from __future__ import annotations

import bz2
import datetime as dt
import struct
import threading
import zipfile
from pathlib import Path
from typing import BinaryIO, Callable

INFO_FILES = (b"info/index.json", b"info/about.json")
_READ_SIZE = 1 << 16
# zstd cannot cap one call's output: small inputs bound what a crafted stream inflates to.
_ZSTD_INPUT = 1 << 14
_OUTPUT_CAP = 1 << 20
_BLOCK = 512
_ZIP_LOCAL = struct.Struct("<4s5H3L2H")
_ZIP_END = struct.Struct("<4s4H2LH")
_ZIP64 = 0xFFFFFFFF


class UnreadablePackage(Exception):
    """The file is not a whole, well-formed conda package."""


class _Decompressed:
    """The decompressed bytes of ``source`` (bz2 or zstd streams, one after another), in
    bounded pieces; ``source`` ending anywhere but at the end of a stream is an error."""

    def __init__(self, source: BinaryIO, kind: str):
        self._source = source
        self._kind = kind
        self._new: Callable = bz2.BZ2Decompressor if kind == "bz2" else _zstd_decompressor
        self._decompressor = self._new()
        self._input = b""      # compressed bytes not yet handed to the decompressor
        self._output = bytearray()
        self._ended = False    # the last stream so far reached its end marker

    def read(self, size: int) -> bytes:
        """Exactly ``size`` bytes, or fewer at the end of the data."""
        while len(self._output) < size and self._step():
            pass
        piece = bytes(self._output[:size])
        del self._output[:size]
        return piece

    def skip(self, size: int) -> int:
        """Pass over ``size`` bytes (decompressing them); how many there were."""
        skipped = 0
        while skipped < size:
            if not self._output and not self._step():
                break
            taken = min(size - skipped, len(self._output))
            del self._output[:taken]
            skipped += taken
        return skipped

    def drain(self) -> None:
        """Decompress the rest, so every checksum to the end of the data is verified."""
        self._output.clear()
        while self._step():
            self._output.clear()

    def _step(self) -> bool:
        """Decompress some more; False at the clean end of the data."""
        if not self._input and self._needs_input():
            self._input = self._source.read(_READ_SIZE)
            if not self._input:
                if not self._ended:
                    raise UnreadablePackage(
                        f"cut short: the file ends inside its {self._kind} data")
                return False
        if self._ended:  # more data after a complete stream: another stream follows
            self._decompressor, self._ended = self._new(), False
        try:
            if self._kind == "bz2":
                self._output += self._decompressor.decompress(self._input, _OUTPUT_CAP)
                self._input = b""
            else:
                piece, self._input = self._input[:_ZSTD_INPUT], self._input[_ZSTD_INPUT:]
                self._output += self._decompressor.decompress(piece)
        except Exception as exc:  # bz2's OSError, zstandard's ZstdError: invalid data
            raise UnreadablePackage(f"damaged {self._kind} data ({exc})") from None
        if self._decompressor.eof:
            self._ended = True
            self._input = self._decompressor.unused_data + self._input
        return True

    def _needs_input(self) -> bool:
        return self._kind != "bz2" or self._ended or self._decompressor.needs_input


_per_thread = threading.local()


def _zstd_decompressor():
    import zstandard

    # A decompression context costs more to make than a small package costs to read.
    if not hasattr(_per_thread, "zstd"):
        _per_thread.zstd = zstandard.ZstdDecompressor()
    return _per_thread.zstd.decompressobj()


def _tar_number(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256, for sizes past 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    """``<length> <key>=<value>\\n`` records of a pax extended header."""
    records, at = {}, 0
    while at < len(data) and data[at:at + 1] != b"\0":
        space = data.index(b" ", at)
        length = int(data[at:space])
        key, _, value = data[space + 1:at + length - 1].partition(b"=")
        records[key] = value
        at += length
    return records


def _header_checksum_ok(header: bytes) -> bool:
    stored = _tar_number(header[148:156])
    if stored == sum(header) - sum(header[148:156]) + 256:  # the field counts as 8 spaces
        return True
    return stored == 256 + sum(struct.unpack_from("148b8x356b", header))  # old signed sums


def _read_tar(stream: _Decompressed, wanted: dict[bytes, bytes | None]) -> None:
    """Walk a tar archive to its end, keeping the contents of the members in ``wanted``."""
    long_name: bytes | None = None
    pax: dict[bytes, bytes] = {}
    while True:
        header = stream.read(_BLOCK)
        if not header:
            break  # no end-of-archive blocks: tolerated, as tar readers do
        if len(header) < _BLOCK:
            raise UnreadablePackage("cut short: the tar archive ends inside a header")
        if header.count(0) == _BLOCK:
            break  # the end of the archive; drain() checks the rest of the stream
        try:
            if not _header_checksum_ok(header):
                raise UnreadablePackage("damaged tar header (its checksum is wrong)")
            size = int(pax[b"size"]) if b"size" in pax else _tar_number(header[124:136])
        except (ValueError, IndexError):
            raise UnreadablePackage("damaged tar header (a number that is none)") from None
        kind = header[156:157]
        padded = -(-size // _BLOCK) * _BLOCK
        if kind in (b"x", b"g", b"L", b"K"):  # pax or GNU headers about the next member
            data = stream.read(padded)
            if len(data) < padded:
                raise UnreadablePackage("cut short: the tar archive ends inside a member")
            try:
                if kind == b"x":
                    pax = _pax_records(data[:size])
            except ValueError:
                raise UnreadablePackage("damaged pax header in the tar archive") from None
            if kind == b"L":
                long_name = data[:size].split(b"\0", 1)[0]
            continue
        name = header[:100].split(b"\0", 1)[0]
        if header[257:262] == b"ustar" and header[345:346] != b"\0":
            name = header[345:500].split(b"\0", 1)[0] + b"/" + name
        name = pax.get(b"path") or long_name or name
        long_name, pax = None, {}
        if name in wanted and kind in (b"0", b"\0", b"7"):
            data = stream.read(padded)
            wanted[name] = data[:size]
            got = len(data)
        else:
            got = stream.skip(padded)
        if got < padded:
            raise UnreadablePackage("cut short: the tar archive ends inside a member")
    stream.drain()


def _read_tar_bz2(handle: BinaryIO) -> dict[bytes, bytes | None]:
    wanted: dict[bytes, bytes | None] = dict.fromkeys(INFO_FILES)
    _read_tar(_Decompressed(handle, "bz2"), wanted)
    return wanted


def _check_zip_records(handle: BinaryIO, members: list[zipfile.ZipInfo]) -> None:
    """The zip's own records agree: its end record with its directory, each local header
    with its directory entry, stored sizes with each other. zipfile trusts one of each."""
    handle.seek(0, 2)
    length = handle.tell()
    handle.seek(max(0, length - 65557))  # the end record, behind at most a 64 KiB comment
    tail = handle.read()
    at = tail.rfind(b"PK\x05\x06")
    _, disk, cd_disk, entries_here, entries, cd_size, cd_offset, comment = \
        _ZIP_END.unpack_from(tail, at)
    end_record = length - len(tail) + at
    inconsistent = UnreadablePackage("damaged .conda (zip) file (its directory is inconsistent)")
    if at + _ZIP_END.size + comment != len(tail) or \
            (disk, cd_disk) not in ((0, 0), (0xFFFF, 0xFFFF)) or \
            (entries != 0xFFFF and not entries_here == entries == len(members)):
        raise inconsistent
    if _ZIP64 not in (cd_size, cd_offset):  # else zipfile read the zip64 records
        if cd_offset + cd_size != end_record:
            raise inconsistent
        handle.seek(cd_offset)
        directory, walked, count = handle.read(cd_size), 0, 0
        while walked < cd_size:  # each entry's lengths must lead to the next, and to the end
            if directory[walked:walked + 4] != b"PK\x01\x02":
                raise inconsistent
            walked += 46 + sum(struct.unpack_from("<3H", directory, walked + 28))
            count += 1
        if walked != cd_size or count != len(members):
            raise inconsistent
    for member in members:
        if member.compress_type == zipfile.ZIP_STORED and member.compress_size != member.file_size:
            raise UnreadablePackage(f"damaged .conda (zip) file (the sizes of "
                                    f"{member.filename} disagree)")
        handle.seek(member.header_offset)
        head = handle.read(_ZIP_LOCAL.size)
        if len(head) < _ZIP_LOCAL.size:
            raise UnreadablePackage("cut short: the .conda (zip) file ends inside a header")
        _, _, flags, method, _, _, crc, packed, size, name_length, extra_length = \
            _ZIP_LOCAL.unpack(head)
        extra = handle.read(name_length + extra_length)[name_length:]
        if packed == size == _ZIP64 and extra[:2] == b"\x01\x00":
            size, packed = struct.unpack_from("<QQ", extra, 4)
        if method != member.compress_type or (not flags & 0x08 and (
                crc, packed, size) != (member.CRC, member.compress_size, member.file_size)):
            raise UnreadablePackage(f"damaged .conda (zip) file (the local header of "
                                    f"{member.filename} disagrees with its directory)")


def _read_conda(handle: BinaryIO) -> dict[bytes, bytes | None]:
    wanted: dict[bytes, bytes | None] = dict.fromkeys(INFO_FILES)
    try:
        archive = zipfile.ZipFile(handle)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise UnreadablePackage(f"not a whole .conda (zip) file ({exc})") from None
    with archive:
        members = archive.infolist()
        tars = {prefix: [m for m in members if m.filename.startswith(prefix)
                         and m.filename.endswith(".tar.zst")] for prefix in ("info-", "pkg-")}
        for prefix, found in tars.items():
            if len(found) != 1:
                raise UnreadablePackage(f"a .conda file holds one {prefix}*.tar.zst; this one "
                                        f"holds {len(found)}")
        try:
            _check_zip_records(handle, members)
            for member in members:
                with archive.open(member) as data:  # its CRC-32 is checked at its end
                    if member is tars["info-"][0] or member is tars["pkg-"][0]:
                        _read_tar(_Decompressed(data, "zstd"), wanted)
                    else:
                        while data.read(_READ_SIZE):
                            pass
        except (zipfile.BadZipFile, OSError, EOFError, struct.error, ValueError) as exc:
            raise UnreadablePackage(f"damaged .conda (zip) file ({exc})") from None
    return wanted


def conda_zip_opens(path: Path) -> bool:
    """Whether ``path`` is a .conda file whose zip opens, records agreeing, with an info
    archive in it: what rattler's indexer needs not to panic on it (the rest of it may
    still be damaged)."""
    try:
        with open(path, "rb") as handle, zipfile.ZipFile(handle) as archive:
            members = archive.infolist()
            _check_zip_records(handle, members)
    except (UnreadablePackage, zipfile.BadZipFile, OSError, EOFError, struct.error, ValueError):
        return False
    return any(m.filename.startswith("info-") and m.filename.endswith(".tar.zst")
               for m in members)


def read_package(path: Path) -> dict:
    """Read ``path`` to its last byte; what the index page shows of it.

    Raises UnreadablePackage (or rattler's parse errors) when any part cannot be read.
    """
    from rattler.package import AboutJson, IndexJson

    with open(path, "rb") as handle:
        if path.name.endswith(".conda"):
            files = _read_conda(handle)
        elif path.name.endswith(".tar.bz2"):
            files = _read_tar_bz2(handle)
        else:
            raise UnreadablePackage("not a conda package file name (.conda or .tar.bz2)")
    for name, data in files.items():
        if data is None:
            raise UnreadablePackage(f"it has no {name.decode()}")
    try:
        index = IndexJson.from_str(files[b"info/index.json"].decode())
        about = AboutJson.from_str(files[b"info/about.json"].decode())
    except UnicodeDecodeError as exc:
        raise UnreadablePackage(f"its info files are not UTF-8 ({exc})") from None
    built = index.timestamp.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M") \
        if index.timestamp else ""
    return {"name": str(index.name.normalized), "version": str(index.version),
            "build": str(index.build), "date": built, "summary": about.summary or "",
            "subdir": index.subdir or "",
            # the file name conda tools give it: <name>-<version>-<build>, as written there
            "stem": f"{index.name.source}-{index.version}-{index.build}"}
