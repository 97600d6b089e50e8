"""Copies of a built .conda package that say they are another package, named as they say.

Tests that need many packages, or a package replaced under its own file name, make them from
one real build: the copy's info/index.json gets another name, version or build, and the file
is named ``<name>-<version>-<build>.conda`` from it, as conda tools name packages.
"""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import zstandard


def _unzstd(data: bytes) -> bytes:
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


def package_as(package: Path, folder: Path, **index: str) -> Path:
    """A copy of the .conda ``package`` in ``folder`` whose index.json has ``index``
    (``name``, ``version``, ``build``) changed, under the file name that follows."""
    with zipfile.ZipFile(package) as archive:
        members = [(info, archive.read(info)) for info in archive.infolist()]
    [info_tar] = [data for info, data in members if info.filename.startswith("info-")]
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(_unzstd(info_tar))) as source, \
            tarfile.open(fileobj=out, mode="w") as copy:
        for member in source.getmembers():
            data = source.extractfile(member).read() if member.isfile() else None
            if member.name == "info/index.json":
                meta = {**json.loads(data), **index}
                data = json.dumps(meta).encode()
                member.size = len(data)
            copy.addfile(member, io.BytesIO(data) if data is not None else None)
    stem = f"{meta['name']}-{meta['version']}-{meta['build']}"
    target = folder / f"{stem}.conda"
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as archive:
        for info, data in members:
            if info.filename.startswith("info-"):
                archive.writestr(f"info-{stem}.tar.zst",
                                 zstandard.ZstdCompressor().compress(out.getvalue()))
            elif info.filename.startswith("pkg-"):
                archive.writestr(f"pkg-{stem}.tar.zst", data)
            else:
                archive.writestr(info.filename, data)
    return target
