"""publish_channel: copy the channel's packages to where other machines read it, and index there.

``publish.url`` (``HUBWORKS_PUBLISH_URL``) names the target:

- ``s3://bucket/prefix``: S3 or an S3-compatible store (``publish.endpoint_url``,
  ``publish.region``, ``publish.force_path_style``). Credentials come the usual AWS way
  (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and
  ``~/.aws``, instance or container roles), resolved once by boto3 and handed to rattler's
  ``index_s3``, which indexes the bucket in place.
- ``file:///folder`` or a path: a plain folder of this machine, e.g. a mounted share;
  rattler's ``index_fs`` indexes it.

Rules, for both:

- Only packages the target lacks are copied: the target is listed (names and sizes; S3 also
  gives each object's MD5 as its ETag) and its repodata read; no package is downloaded.
- Nothing on the target is deleted or overwritten. A package is written only if its name is
  free (S3 ``If-None-Match: *``; a folder: a hard link from a hidden temporary file). A file of
  the same name with other bytes is left alone and reported.
- Nothing half-published: a package is whole before its name exists (one S3 PUT; a folder:
  written, synced, then linked), and the index runs after the uploads, so a package that
  failed to upload is in no index.
- Two publishers at once both end indexed: ``index_s3`` writes repodata with conditional
  requests (``If-Match`` on the ETag it read, ``If-None-Match`` for new files) and re-reads
  and retries when another indexer got there first; folders are indexed under a lock file.
  Either way the published repodata is read back afterwards and indexing repeated until it
  lists every package this run published.
- A target's index is whole only when its repodata.json.zst and sharded repodata list what
  its repodata.json lists (an index cut short, e.g. by a full share, is not): until then the
  task is not up to date, and the next run indexes again.
- Checked before anything is written: an S3 prefix that S3 keys and URLs spell alike (so the
  packages and rattler's index land under the same keys), a folder of this machine that is
  writable and whose subdirs are no links (rattler's indexer crashes on a linked subdir).
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ..core.errors import HubworksError, reports_errors
from ..core.fsutil import atomic_write_json, exclusive_lock, is_package, read_json
from ..core.reporter import print_line
from ..core.settings import Settings
from .index import SHARD_INDEX, shard_names
from .repodata import package_names, read_repodata, records, repodata_files

IMMUTABLE = "public, max-age=31536000, immutable"
# Spelled alike in an S3 key and in a URL: rattler keys by the URL's (encoded) path.
S3_KEY_PART = re.compile(r"[A-Za-z0-9._~-]+")
INDEX_ATTEMPTS = 3
S3_CONNECT_SECONDS = 10
CREDENTIALS_FIX = ("give credentials the usual AWS way: AWS_ACCESS_KEY_ID and "
                   "AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), or AWS_PROFILE with "
                   "~/.aws/credentials; they must allow listing the bucket and putting objects")


@dataclass(frozen=True)
class LocalPackage:
    key: str        # <subdir>/<file name>
    path: Path
    size: int
    md5: str
    sha256: str


@dataclass
class TargetFile:
    size: int
    md5: str = ""   # known without reading the file (S3 ETag of a single-part upload)


def local_packages(channel_dir: Path) -> dict[str, LocalPackage]:
    """The indexed packages of channel/, from its repodata (no package is read)."""
    found: dict[str, LocalPackage] = {}
    for repodata in repodata_files(channel_dir):
        subdir = repodata.parent.name
        for filename, record in records(read_repodata(repodata)):
            path = repodata.parent / filename
            if path.is_file():
                found[f"{subdir}/{filename}"] = LocalPackage(
                    f"{subdir}/{filename}", path, record.get("size", path.stat().st_size),
                    record.get("md5", ""), record.get("sha256", ""))
    return found


# ---------------------------------------------------------------- targets

class Target:
    """Where packages are published. Subclasses list, write new files only, and index."""

    url: str

    def files(self) -> dict[str, TargetFile]:
        """Package files on the target by ``<subdir>/<name>``."""
        raise NotImplementedError

    def repodata(self, subdir: str) -> dict:
        """The target's ``<subdir>/repodata.json`` ({} when there is none)."""
        raise NotImplementedError

    def index_file(self, subdir: str, name: str) -> bytes | None:
        """The bytes of ``<subdir>/<name>`` on the target; None when there is none."""
        raise NotImplementedError

    def shard_files(self, subdir: str) -> set[str]:
        """The file names in ``<subdir>/shards/``."""
        raise NotImplementedError

    def check_writable(self) -> None:
        """Raise HubworksError, naming the target and the fix, when it cannot be written."""

    def put_new(self, package: LocalPackage) -> bool:
        """Write ``package`` unless its name exists; False when it did (nothing written)."""
        raise NotImplementedError

    def index(self) -> None:
        raise NotImplementedError

    def reader_url(self) -> str:
        """Where conda clients read the published channel, for the closing message."""
        return self.url

    def indexed(self, subdirs: set[str]) -> dict[str, dict]:
        """The target's repodata records of ``subdirs`` and noarch, by ``<subdir>/<name>``."""
        found = {}
        for subdir in sorted(subdirs | {"noarch"}):
            for filename, record in records(self.repodata(subdir)):
                found[f"{subdir}/{filename}"] = record
        return found

    def incomplete(self, subdirs: set[str]) -> list[str]:
        """The index files of ``subdirs`` (and noarch) that do not list what their
        repodata.json lists: written before an index run was cut short, or missing."""
        import zstandard

        gaps = []
        for subdir in sorted(subdirs | {"noarch"}):
            repodata = self.repodata(subdir)
            if not repodata:
                continue  # never indexed: its packages count as unindexed
            files = {filename for filename, _ in records(repodata)}
            try:
                zst = self.index_file(subdir, "repodata.json.zst") or b""
                text = zstandard.ZstdDecompressor().decompressobj().decompress(zst)
                if {filename for filename, _ in records(orjson_loads(text))} != files:
                    gaps.append(f"{subdir}/repodata.json.zst")
            except (ValueError, zstandard.ZstdError):
                gaps.append(f"{subdir}/repodata.json.zst")
            try:
                shards = shard_names(self.index_file(subdir, SHARD_INDEX) or b"")
                if set(shards) != package_names(repodata) or \
                        not set(shards.values()) <= self.shard_files(subdir):
                    gaps.append(f"{subdir}/{SHARD_INDEX}")
            except Exception:  # cut short or not msgpack: zstandard's and msgpack's errors
                gaps.append(f"{subdir}/{SHARD_INDEX}")
        return gaps


def orjson_loads(data: bytes) -> dict:
    """JSON text as a dict; ValueError when it is not a JSON object."""
    import orjson

    value = orjson.loads(data)  # orjson's JSONDecodeError is a ValueError
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


class FolderTarget(Target):
    def __init__(self, folder: Path, url: str):
        self.folder = folder
        self.url = url
        if not folder.is_dir():
            raise HubworksError(
                f"the publish target {url} is not a folder that exists.",
                fix="create it (or mount the share), or correct publish.url "
                    "(HUBWORKS_PUBLISH_URL)")
        for entry in os.scandir(folder):
            if entry.is_symlink() and entry.is_dir():
                raise HubworksError(
                    f"the publish target {url} has a link where a subdir belongs: "
                    f"{entry.name} -> {os.readlink(entry.path)} (rattler's indexer cannot "
                    f"index through it, and writes through it would leave the target).",
                    fix=f"replace the link {folder / entry.name} with the folder it points "
                        f"to (move the folder there), or point publish.url at a folder "
                        f"without links")

    def files(self) -> dict[str, TargetFile]:
        found = {}
        for subdir in self.folder.iterdir():
            if not subdir.is_dir() or subdir.name.startswith("."):
                continue
            for entry in os.scandir(subdir):
                if is_package(entry.name) and entry.is_file():
                    found[f"{subdir.name}/{entry.name}"] = TargetFile(entry.stat().st_size)
        return found

    def repodata(self, subdir: str) -> dict:
        return read_repodata(self.folder / subdir / "repodata.json")

    def index_file(self, subdir: str, name: str) -> bytes | None:
        try:
            return (self.folder / subdir / name).read_bytes()
        except FileNotFoundError:
            return None

    def shard_files(self, subdir: str) -> set[str]:
        try:
            return set(os.listdir(self.folder / subdir / "shards"))
        except FileNotFoundError:
            return set()

    def _cannot_write(self, why: str) -> HubworksError:
        return HubworksError(f"the publish target {self.url} is not writable: {why}.",
                             fix="mount the share read-write, or make the folder writable "
                                 "for this user; then run publish_channel again")

    def check_writable(self) -> None:
        probe = self.folder / f".hubworks-write-check.{secrets.token_hex(4)}"
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            os.unlink(probe)
        except OSError as exc:
            if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise self._cannot_write(exc.strerror) from None
            raise HubworksError(f"the publish target {self.url} cannot be written: "
                                f"{exc.strerror or exc}.",
                                fix="check the folder and its share, then run "
                                    "publish_channel again") from None

    def put_new(self, package: LocalPackage) -> bool:
        target = self.folder / package.key
        # A hidden temporary name no indexer reads; linked to its name only once complete.
        partial = target.parent / f".{target.name}.{secrets.token_hex(4)}.partial"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with package.path.open("rb") as source, partial.open("xb") as handle:
                while block := source.read(1 << 20):
                    handle.write(block)
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(partial, target)  # fails if the name exists: never overwrites
            except FileExistsError:
                return False
            return True
        except OSError as exc:
            raise HubworksError(
                f"{package.key} could not be written to {self.url}: "
                f"{exc.strerror or exc}.",
                fix=f"make {target.parent} writable for this user (and the share mounted "
                    f"read-write)") from None
        finally:
            partial.unlink(missing_ok=True)

    def index(self) -> None:
        import asyncio  # here, not at the top: loading the tasks does not need it

        from rattler.index import index_fs

        scratch = self.folder / ".tmp"  # where rattler writes each file before its rename
        try:
            with exclusive_lock(self.folder / ".hubworks-publish.lock",
                                f"the index of {self.url}"):
                (self.folder / "noarch").mkdir(exist_ok=True)  # conda clients require noarch
                before = set(os.listdir(scratch)) if scratch.is_dir() else None
                try:
                    asyncio.run(index_fs(self.folder, write_zst=True, write_shards=True))
                finally:
                    _remove_new_files(scratch, before)
        except Exception as exc:  # OSError, or rattler's own types whose text says why
            raise self._index_failure(exc) from None

    def _index_failure(self, exc: Exception) -> HubworksError:
        code = exc.errno if isinstance(exc, OSError) else _os_error_code(str(exc))
        if code in (errno.EACCES, errno.EROFS, errno.EPERM):
            return self._cannot_write(os.strerror(code))
        if code in (errno.ENOSPC, errno.EDQUOT):
            return HubworksError(
                f"{self.url} ran out of space while it was indexed: its packages are "
                f"there, but its index does not list them all yet.",
                fix="free space on the share (or raise its quota), then run publish_channel "
                    "again: it indexes the target again")
        return HubworksError(f"rattler could not index {self.url}: {_short(str(exc))}",
                             fix="fix what the message names, then run publish_channel "
                                 "again (published packages stay)")


def _os_error_code(text: str) -> int | None:
    """The OS error number in the text of a rattler error ("... (os error 28)")."""
    found = re.search(r"\(os error (\d+)\)", text)
    return int(found.group(1)) if found else None


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _remove_new_files(folder: Path, before: set[str] | None) -> None:
    """Remove what an index run left in ``folder`` (files cut short by an error), and the
    folder itself if the run made it."""
    if not folder.is_dir():
        return
    for name in set(os.listdir(folder)) - (before or set()):
        (folder / name).unlink(missing_ok=True)
    if before is None:
        try:
            folder.rmdir()
        except OSError:
            pass  # not empty: another run's files


@dataclass
class S3Location:
    bucket: str
    prefix: str     # no leading or trailing slash; may be ''

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name


class S3Target(Target):
    def __init__(self, settings: Settings, url: str):
        import boto3
        from botocore.config import Config

        self.where = s3_location(url)
        self.url = f"s3://{self.where.bucket}/{self.where.prefix}".rstrip("/")
        publish = settings.publish
        session = boto3.session.Session()
        self.region = publish.region or session.region_name or "us-east-1"
        config = Config(
            connect_timeout=S3_CONNECT_SECONDS, read_timeout=60,
            retries={"max_attempts": 2, "mode": "standard"},
            s3={"addressing_style": "path" if publish.force_path_style else "virtual"},
            # only when the store asks for them: many S3-compatible stores reject them
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required")
        self.client = session.client("s3", region_name=self.region, config=config,
                                     endpoint_url=publish.endpoint_url or None)
        self.endpoint = self.client.meta.endpoint_url
        self.path_style = publish.force_path_style
        credentials = session.get_credentials()
        if credentials is None:
            raise HubworksError(f"no AWS credentials were found for {self.url}.",
                                fix=CREDENTIALS_FIX)
        self.credentials = credentials.get_frozen_credentials()

    def _fail(self, exc: Exception, doing: str) -> HubworksError:
        """One message naming the target and the fix, for what boto3 raised."""
        from botocore.exceptions import ClientError, EndpointConnectionError, \
            NoCredentialsError

        where = f"{self.url} (endpoint {self.endpoint})"
        if isinstance(exc, NoCredentialsError):
            return HubworksError(f"no AWS credentials were found for {where}.",
                                 fix=CREDENTIALS_FIX)
        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            if code == "NoSuchBucket":
                return HubworksError(
                    f"the bucket {self.where.bucket!r} does not exist at {self.endpoint} "
                    f"(publish target {self.url}).",
                    fix=f"create it (e.g. `aws s3 mb s3://{self.where.bucket}`), or correct "
                        f"publish.url / publish.endpoint_url")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                        "InvalidToken", "AccessDenied", "403", "Forbidden"):
                return HubworksError(
                    f"{where} refused these credentials while {doing} ({code}).",
                    fix=CREDENTIALS_FIX)
            message = exc.response.get("Error", {}).get("Message", "") or str(exc)
            return HubworksError(f"{where} answered {code or 'an error'} while {doing}: "
                                 f"{message}", fix="check publish.url and the bucket's settings")
        if isinstance(exc, EndpointConnectionError) or "connect" in type(exc).__name__.lower():
            return HubworksError(
                f"the S3 endpoint {self.endpoint} cannot be reached (publish target "
                f"{self.url}).",
                fix="check publish.endpoint_url (HUBWORKS_PUBLISH_ENDPOINT_URL) and that "
                    "this machine reaches it")
        return HubworksError(f"{where}: {doing} failed: {exc}",
                             fix="check publish.url and publish.endpoint_url")

    def files(self) -> dict[str, TargetFile]:
        from botocore.exceptions import BotoCoreError, ClientError

        found = {}
        start = self.where.key("")
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.where.bucket, Prefix=start)
            for page in pages:
                for item in page.get("Contents", []):
                    name = item["Key"][len(start):]
                    subdir, _, filename = name.partition("/")
                    if "/" in filename or not is_package(filename):
                        continue
                    etag = item.get("ETag", "").strip('"')
                    found[name] = TargetFile(item["Size"], etag if "-" not in etag else "")
        except (BotoCoreError, ClientError) as exc:
            raise self._fail(exc, "listing the bucket") from None
        return found

    def repodata(self, subdir: str) -> dict:
        import orjson
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            body = self.client.get_object(Bucket=self.where.bucket,
                                          Key=self.where.key(f"{subdir}/repodata.json"))["Body"]
            return orjson.loads(body.read())
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return {}
            raise self._fail(exc, f"reading {subdir}/repodata.json") from None
        except BotoCoreError as exc:
            raise self._fail(exc, f"reading {subdir}/repodata.json") from None
        except orjson.JSONDecodeError:
            return {}  # a broken index is rewritten by the next index run

    def index_file(self, subdir: str, name: str) -> bytes | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.get_object(Bucket=self.where.bucket,
                                          Key=self.where.key(f"{subdir}/{name}"))["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise self._fail(exc, f"reading {subdir}/{name}") from None
        except BotoCoreError as exc:
            raise self._fail(exc, f"reading {subdir}/{name}") from None

    def shard_files(self, subdir: str) -> set[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        start = self.where.key(f"{subdir}/shards/")
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.where.bucket, Prefix=start)
            return {item["Key"][len(start):] for page in pages
                    for item in page.get("Contents", [])}
        except (BotoCoreError, ClientError) as exc:
            raise self._fail(exc, f"listing {subdir}/shards") from None

    def put_new(self, package: LocalPackage) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            with package.path.open("rb") as body:
                self.client.put_object(
                    Bucket=self.where.bucket, Key=self.where.key(package.key), Body=body,
                    IfNoneMatch="*", CacheControl=IMMUTABLE,
                    ContentType="application/octet-stream")
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                return False
            raise self._fail(exc, f"uploading {package.key}") from None
        except BotoCoreError as exc:
            raise self._fail(exc, f"uploading {package.key}") from None

    def index(self) -> None:
        import asyncio

        from rattler.index import S3Credentials, index_s3

        credentials = S3Credentials(
            endpoint_url=self.endpoint, region=self.region,
            access_key_id=self.credentials.access_key,
            secret_access_key=self.credentials.secret_key,
            session_token=self.credentials.token,
            addressing_style="path" if self.path_style else "virtual-host")
        try:
            asyncio.run(index_s3(self.url, credentials=credentials, write_zst=True,
                                 write_shards=True))
        except Exception as exc:  # rattler raises its own types; the text says what failed
            raise HubworksError(
                f"rattler could not index {self.url} (endpoint {self.endpoint}): "
                f"{_store_error(str(exc))}",
                fix="check that the credentials may read, list and put objects in the "
                    "bucket, then run publish_channel again (published packages stay)") from None

    def reader_url(self) -> str:
        if self.path_style or "amazonaws.com" not in self.endpoint:
            return f"{self.endpoint.rstrip('/')}/{self.where.bucket}/{self.where.key('')}"
        return f"https://{self.where.bucket}.s3.{self.region}.amazonaws.com/{self.where.key('')}"


def s3_location(url: str) -> S3Location:
    """Bucket and prefix of an ``s3://`` URL, refused unless boto3 (which takes the prefix as
    it is) and rattler (which takes the URL's path, percent-encoded and with ``..`` resolved)
    put the packages and the index under the same keys."""
    parts = urlsplit(url)
    if not parts.netloc:
        raise HubworksError(f"publish.url {url!r} names no bucket.",
                            fix="write it as s3://bucket or s3://bucket/prefix")
    fix = ("write the prefix with only letters, digits and - _ . ~ in each part, and one / "
           "between parts, e.g. s3://bucket/conda/internal")
    if "#" in url or "?" in url:
        raise HubworksError(f"publish.url {url!r} has a '#' or '?': a URL's path ends there, "
                            f"so the packages and the index would go to different keys.",
                            fix=fix)
    path = parts.path[1:]
    segments = path[:-1].split("/") if path.endswith("/") else path.split("/")
    if path in ("", "/"):
        return S3Location(parts.netloc, "")
    for segment in segments:
        if segment in ("", ".", ".."):
            shown = "an empty part (//)" if not segment else f"a {segment!r} part"
            raise HubworksError(
                f"publish.url {url!r} has {shown} in its prefix, so rattler's indexer would "
                f"index another place than the one the packages go to.", fix=fix)
        if not S3_KEY_PART.fullmatch(segment):
            odd = "".join(sorted(set(S3_KEY_PART.sub("", segment))))
            raise HubworksError(
                f"publish.url {url!r} has characters in its prefix that S3 keys and URLs "
                f"spell differently ({odd!r}): the packages and their index would land under "
                f"different keys.", fix=fix)
    return S3Location(parts.netloc, "/".join(segments))


def _store_error(text: str) -> str:
    """What the store answered, from the text of a rattler error (which also holds every
    request and response header): its error code and message, or the error's first line."""
    text = " ".join(text.split())
    answer = re.search(r'S3Error \{ code: "([^"]*)", message: "((?:[^"\\]|\\.)*)"', text)
    step = re.match(r"(\w+) \(\w+\) at (\w+)", text)  # "PermissionDenied (persistent) at list"
    doing = f" (its {step.group(2)} request)" if step else ""
    if answer:
        return f"the store answered {answer.group(1)}: {answer.group(2)}{doing}"
    cause = text.rpartition(" => ")[2] if " => " in text else text
    return _short(cause) + doing


def open_target(settings: Settings) -> Target:
    """The target ``publish.url`` names, its settings checked."""
    url = settings.publish.url.strip()
    if not url:
        raise HubworksError(
            "publish.url is not set, so publish_channel has nowhere to publish.",
            fix="set publish.url (HUBWORKS_PUBLISH_URL) to s3://bucket/prefix or a folder "
                "(file:///srv/channel)")
    scheme = urlsplit(url).scheme
    if scheme == "s3":
        return S3Target(settings, url)
    if scheme == "file":
        host = urlsplit(url).netloc
        if host not in ("", "localhost"):
            raise HubworksError(
                f"publish.url {url!r} names the host {host!r}: publish_channel publishes "
                f"only to folders of this machine.",
                fix=f"mount the share on this machine and name the mount point, e.g. "
                    f"file:///mnt/{host} (or a plain path)")
        return FolderTarget(Path(unquote(urlsplit(url).path)), url)
    if scheme == "" or (len(scheme) == 1 and os.name == "nt"):
        folder = (settings.root / os.path.expanduser(url)).resolve()
        return FolderTarget(folder, folder.as_uri())
    raise HubworksError(
        f"publish.url {url!r} is not a target publish_channel knows.",
        fix="use s3://bucket/prefix (S3 or S3-compatible object storage) or a folder "
            "(file:///path)")


# ---------------------------------------------------------------- comparing and publishing

@dataclass
class Plan:
    missing: list[LocalPackage] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)   # same name, other bytes
    unindexed: list[str] = field(default_factory=list)   # on the target, not in its index
    incomplete: list[str] = field(default_factory=list)  # index files behind repodata.json

    @property
    def nothing_to_do(self) -> bool:
        # A same-named file with other bytes stays as it is: nothing to do about it here.
        return not (self.missing or self.unindexed or self.incomplete)


def plan_publish(local: dict[str, LocalPackage], target: Target) -> Plan:
    """What the target lacks, from its listing and its repodata only."""
    on_target = target.files()
    subdirs = {key.split("/", 1)[0] for key in local}
    indexed = target.indexed(subdirs)
    plan = Plan(incomplete=target.incomplete(subdirs))
    for key, package in sorted(local.items()):
        there = on_target.get(key)
        if there is None:
            plan.missing.append(package)
            continue
        record = indexed.get(key)
        if (there.size != package.size or (there.md5 and package.md5 and there.md5 != package.md5)
                or (record and record.get("sha256") and record["sha256"] != package.sha256)):
            plan.conflicts.append(key)
        elif record is None:
            plan.unindexed.append(key)
    return plan


def _kept_record(settings: Settings, target: Target) -> Path:
    name = hashlib.sha256(target.url.encode()).hexdigest()[:16]
    return settings.state("publish", f"{name}.json")


def _kept_signature(local: dict[str, LocalPackage], keys: list[str]) -> list[str]:
    return sorted(f"{key} {local[key].sha256}" for key in keys)


def publish_is_current(settings: Settings) -> bool:
    """doit's uptodate: the target holds and indexes every package (nothing downloaded),
    and every local rebuild it keeps its own copy of was reported once."""
    try:
        target = open_target(settings)
        local = local_packages(settings.channel_dir)
        plan = plan_publish(local, target)
        reported = read_json(_kept_record(settings, target), [])
        return plan.nothing_to_do and _kept_signature(local, plan.conflicts) == reported
    except Exception:  # unclear: run, and let the action say what is wrong
        return False


def publish_channel(settings: Settings) -> str:
    """Copy what the target lacks, index it, and check the index; returns a summary."""
    target = open_target(settings)
    local = local_packages(settings.channel_dir)
    plan = plan_publish(local, target)
    if not plan.nothing_to_do:
        target.check_writable()  # one message for the target, not one per package
    copies = _copy_missing(target, plan.missing)
    if copies.copied or plan.unindexed or copies.raced or plan.incomplete:
        _index_until_listed(target, set(copies.copied) | set(plan.unindexed),
                            {key.split("/", 1)[0] for key in local})
    # Another publisher wrote a name meanwhile: compare again.
    kept = sorted(set(plan_publish(local, target).conflicts if copies.raced else plan.conflicts))
    _report_kept(settings, target, local, kept)
    if copies.failed:
        raise _copy_failure(target, copies.failed)
    if not copies.copied and not plan.unindexed:
        if plan.incomplete:
            return (f"indexed {target.url} again: it holds all {len(local)} packages, and "
                    f"these index files did not list them all: {', '.join(plan.incomplete)}")
        return f"{target.url} is up to date: it holds all {len(local)} packages"
    return (f"published {len(copies.copied)} package(s) to {target.url} "
            f"({len(local) - len(copies.copied)} already there); indexed. Conda clients read "
            f"it at {target.reader_url()}")


@dataclass
class Copies:
    """What copying the missing packages did."""

    copied: list[str] = field(default_factory=list)
    raced: bool = False  # another publisher wrote one of the names first
    failed: dict[str, str] = field(default_factory=dict)  # key -> why


def _copy_missing(target: Target, missing: list[LocalPackage]) -> Copies:
    """Write each package under a free name; one that fails leaves the others to go on."""
    copies = Copies()
    for package in missing:
        try:
            if target.put_new(package):
                copies.copied.append(package.key)
                print_line(f"   published {package.key}")
            else:
                copies.raced = True
        except HubworksError as exc:
            copies.failed[package.key] = exc.message  # the others are still published and indexed
    return copies


def _report_kept(settings: Settings, target: Target, local: dict[str, LocalPackage],
                 kept: list[str]) -> None:
    """Say which local rebuilds the target keeps its own copy of, and remember them, so that
    publish_is_current holds once they were reported."""
    if kept:
        # hubworks rebuilds dependents under the same file name; a published file stays.
        print_line(f"   kept the copies {target.url} has of {len(kept)} package(s) rebuilt "
                   f"here under the same name (published packages never change; bump the "
                   f"recipe's build.number to publish new contents): {', '.join(kept)}")
    atomic_write_json(_kept_record(settings, target), _kept_signature(local, kept))


def _copy_failure(target: Target, failed: dict[str, str]) -> HubworksError:
    lines = "\n".join(f"    {key}: {message}" for key, message in sorted(failed.items()))
    return HubworksError(
        f"{len(failed)} package(s) could not be published to {target.url} and are in "
        f"no index there:\n{lines}",
        fix="fix what the message names (credentials that may put those keys, space on "
            "the share), then run publish_channel again: it copies only what is missing")


def _index_until_listed(target: Target, wanted: set[str], subdirs: set[str]) -> None:
    """Index, then read the index back: a server that ignored a conditional write can
    leave another publisher's index in place, so index again until ours is listed, in
    every index file of ``subdirs``."""
    subdirs = subdirs | {key.split("/", 1)[0] for key in wanted}
    for _ in range(INDEX_ATTEMPTS):
        target.index()
        if wanted <= set(target.indexed(subdirs)) and not target.incomplete(subdirs):
            return
    missing = ", ".join(sorted(wanted - set(target.indexed(subdirs)))
                        + target.incomplete(subdirs))
    raise HubworksError(f"{target.url} was indexed {INDEX_ATTEMPTS} times and its repodata "
                        f"still lacks: {missing}.",
                        fix="run publish_channel again once other publishers are done")


@reports_errors
def run_publish_channel(settings: Settings) -> None:
    print_line(f"   {publish_channel(settings)}")

