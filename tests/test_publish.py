"""publish_channel against real targets: moto's S3 server on loopback, and a plain folder.

The story: build and index recipes, publish, install from the published channel with a
real conda client (py-rattler); publish again and nothing is copied; two publishers at
once both end indexed; bad input gets one message naming the target and the fix, and a
package that failed to upload is in no index.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time

import msgpack
import pytest
import zstandard

from tasks.channel.publish import FolderTarget, LocalPackage
from tests.conftest import DODO, Workspace, free_port
from tests.package_copies import package_as
from tests.test_conda_client import install

pytest_plugins = ["tests.s3_fixtures"]  # the moto_endpoint and s3_store fixtures


def published_names(store, bucket: str, prefix: str = "conda") -> list[str]:
    data = store.repodata(bucket, f"{prefix}/noarch/repodata.json")
    return sorted(data.get("packages.conda", {}))


def test_publish_to_s3_install_from_it_and_publish_again(workspace, s3_store, tmp_path):
    ws = workspace
    ws.add_recipe("tool", version="1.0.0")
    ws.add_recipe("report-kit", version="2.1.0", run=["tool"])
    bucket = s3_store.make_bucket("office-channel")
    s3_store.configure(ws, f"s3://{bucket}/conda")

    run = ws.doit("publish_channel")
    assert "publish_channel" in run.executed
    assert "published 2 package(s) to s3://office-channel/conda (0 already there)" in run.output
    keys = s3_store.keys(bucket)
    assert {"conda/noarch/repodata.json", "conda/noarch/repodata.json.zst",
            "conda/noarch/repodata_shards.msgpack.zst"} <= set(keys)
    assert published_names(s3_store, bucket) == ws.packages()

    # A real conda client installs from the bucket's URL, the dependency along with it.
    url = f"{s3_store.endpoint}/{bucket}/conda/"
    assert f"Conda clients read it at {url}" in run.output
    records = install(url, ["report-kit"], tmp_path / "env", tmp_path / "cache")
    assert set(records) == {"report-kit", "tool"}
    assert (tmp_path / "env" / "share" / "tool" / "version.txt").read_text() == "tool 1.0.0\n"

    # Again: up to date from a listing and the repodata; nothing is written.
    stamps = {k: s3_store.client.head_object(Bucket=bucket, Key=k)["LastModified"]
              for k in keys}
    again = ws.doit("publish_channel")
    assert again.executed == [] and "publish_channel" in again.up_to_date
    assert stamps == {k: s3_store.client.head_object(Bucket=bucket, Key=k)["LastModified"]
                      for k in keys}

    # A new version: only that package is copied; the old one stays available.
    ws.add_recipe("tool", version="1.1.0")
    newer = ws.doit("publish_channel")
    assert "published 1 package(s) to s3://office-channel/conda (2 already there)" \
        in newer.output
    assert published_names(s3_store, bucket) == sorted(
        ["report-kit-2.1.0-h4616a5c_0.conda", "tool-1.0.0-h4616a5c_0.conda",
         "tool-1.1.0-h4616a5c_0.conda"])


def test_a_published_package_is_never_overwritten(workspace, s3_store):
    ws = workspace
    ws.add_recipe("tool")
    bucket = s3_store.make_bucket("office-channel")
    s3_store.configure(ws, f"s3://{bucket}/conda")
    ws.doit("publish_channel")
    key = "conda/noarch/tool-1.0.0-h4616a5c_0.conda"
    before = s3_store.client.head_object(Bucket=bucket, Key=key)["ETag"]

    # Rebuilt with other contents: a new build number here, published beside the old one.
    ws.add_recipe("tool", script=["echo changed > $PREFIX/share/tool/changed.txt"])
    ws.doit("publish_channel")
    assert s3_store.client.head_object(Bucket=bucket, Key=key)["ETag"] == before
    s3_store.client.head_object(Bucket=bucket, Key=key.replace("_0.conda", "_1.conda"))

    # A file replaced by hand under a published name: the target keeps its copy, and says so.
    noarch = ws.channel / "noarch"
    package_as(noarch / "tool-1.0.0-h4616a5c_1.conda", ws.state, build="h4616a5c_0").replace(
        noarch / "tool-1.0.0-h4616a5c_0.conda")
    run = ws.doit("publish_channel")
    assert ("kept the copies s3://office-channel/conda has of 1 package(s) rebuilt here under "
            "the same name (published packages never change; bump the recipe's build.number "
            "to publish new contents): noarch/tool-1.0.0-h4616a5c_0.conda") in run.output
    assert s3_store.client.head_object(Bucket=bucket, Key=key)["ETag"] == before
    # That is no reason to run again: the target holds a package of every name.
    assert "publish_channel" in ws.doit("publish_channel").up_to_date


@pytest.mark.parametrize("target", ["s3", "folder"])
def test_two_publishers_at_once_both_end_indexed(tmp_path, s3_store, target):
    if target == "s3":
        bucket = s3_store.make_bucket("office-channel")
        url = f"s3://{bucket}/conda"

        def names():
            return published_names(s3_store, bucket)
    else:
        share = tmp_path / "share"
        share.mkdir()
        url = share.as_uri()

        def names():
            return sorted(json.loads((share / "noarch" / "repodata.json").read_text())[
                "packages.conda"])
    for version in ("1.0.0", "2.0.0", "3.0.0"):
        pair = []
        for name in ("alpha", "beta"):
            ws = Workspace(tmp_path / f"{name}-{version}")
            s3_store.configure(ws, url)
            ws.add_recipe(name, version=version)
            ws.doit("index_channel")
            pair.append(ws)
        # Both publish at the same moment: each uploads its package and indexes the target.
        runs = [subprocess.Popen([sys.executable, "-m", "doit", "-f", str(DODO), "-d",
                                  str(ws.root), "publish_channel"], env=ws.env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for ws in pair]
        outputs = [run.communicate(timeout=300)[0] for run in runs]
        assert [run.returncode for run in runs] == [0, 0], outputs
        for name in ("alpha", "beta"):
            assert f"{name}-{version}-h4616a5c_0.conda" in names(), (names(), outputs)
    assert len(names()) == 6


def test_bad_targets_get_one_message_naming_the_target_and_the_fix(workspace, s3_store):
    ws = workspace
    ws.add_recipe("tool")
    s3_store.make_bucket("office-channel")

    def failure(**env: str) -> str:
        s3_store.configure(ws, env.pop("url", "s3://office-channel/conda"), **env)
        run = ws.doit("publish_channel", check=False)
        assert run.returncode != 0, run.output
        assert run.output.count("fix:") == 1 and "Traceback" not in run.output, run.output
        return run.output

    unreachable = f"http://127.0.0.1:{free_port()}"
    out = failure(HUBWORKS_PUBLISH_ENDPOINT_URL=unreachable)
    assert f"the S3 endpoint {unreachable} cannot be reached (publish target " \
           f"s3://office-channel/conda)" in out
    assert "fix: check publish.endpoint_url (HUBWORKS_PUBLISH_ENDPOINT_URL)" in out

    out = failure(url="s3://no-such-bucket/conda")
    assert f"the bucket 'no-such-bucket' does not exist at {s3_store.endpoint}" in out
    assert "fix: create it (e.g. `aws s3 mb s3://no-such-bucket`)" in out

    out = failure(HUBWORKS_PUBLISH_URL="ftp://example/channel")
    assert "publish.url 'ftp://example/channel' is not a target publish_channel knows" in out

    out = failure(HUBWORKS_PUBLISH_URL="file://fileserver/srv/conda")
    assert ("publish.url 'file://fileserver/srv/conda' names the host 'fileserver': "
            "publish_channel publishes only to folders of this machine") in out
    assert "fix: mount the share on this machine" in out

    # With IAM checks on, an unknown key pair is refused.
    s3_store.enforce_iam()
    out = failure(AWS_ACCESS_KEY_ID="AKIAWRONGWRONGWRONG1", AWS_SECRET_ACCESS_KEY="wrong")
    assert "s3://office-channel/conda (endpoint " in out
    assert "refused these credentials while listing the bucket (InvalidAccessKeyId)" in out
    assert "fix: give credentials the usual AWS way: AWS_ACCESS_KEY_ID" in out
    assert "tool-1.0.0" not in out


@pytest.fixture
def small_share(tmp_path):
    """A folder on a 512 KiB tmpfs: a real filesystem that runs out of space."""
    folder = tmp_path / "small-share"
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(folder)],
                   check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_package_that_failed_to_upload_is_in_no_index(workspace, small_share):
    ws = workspace
    ws.add_recipe("alpha")
    # 600 KB of random bytes do not compress: this package cannot fit on the share.
    ws.add_recipe("beta", script=["head -c 600000 /dev/urandom > $PREFIX/share/beta/blob"])
    ws.env["HUBWORKS_PUBLISH_URL"] = small_share.as_uri()
    run = ws.doit("publish_channel", check=False)
    assert run.returncode != 0
    assert run.output.count("fix:") == 1 and "Traceback" not in run.output, run.output
    assert (f"1 package(s) could not be published to {small_share.as_uri()} and are in no "
            f"index there:\n    noarch/beta-1.0.0-h4616a5c_0.conda: noarch/beta-1.0.0-"
            f"h4616a5c_0.conda could not be written to {small_share.as_uri()}: No space left "
            f"on device") in run.output, run.output
    assert "fix: fix what the message names" in run.output
    # The package that fitted is published and indexed; the other left no trace.
    repodata = json.loads((small_share / "noarch" / "repodata.json").read_text())
    assert sorted(repodata["packages.conda"]) == ["alpha-1.0.0-h4616a5c_0.conda"]
    assert sorted(p.name for p in (small_share / "noarch").iterdir()
                  if "beta" in p.name) == []


def test_publish_to_a_folder(workspace, tmp_path):
    ws = workspace
    ws.add_recipe("tool")
    ws.add_recipe("report-kit", run=["tool"])
    share = tmp_path / "share" / "conda"
    ws.env["HUBWORKS_PUBLISH_URL"] = share.as_uri()
    missing = ws.doit("publish_channel", check=False)
    assert f"the publish target {share.as_uri()} is not a folder that exists" in missing.output
    assert "fix: create it (or mount the share)" in missing.output

    share.mkdir(parents=True)
    run = ws.doit("publish_channel")
    assert f"published 2 package(s) to {share.as_uri()}" in run.output
    assert not list(share.rglob(".*.partial"))
    records = install(share.as_uri(), ["report-kit"], tmp_path / "env", tmp_path / "cache")
    assert set(records) == {"report-kit", "tool"}
    assert ws.doit("publish_channel").up_to_date == ["publish_channel"] or \
        "publish_channel" in ws.doit("publish_channel").up_to_date

    # A second publisher with another package: both are listed; nothing was replaced.
    other = Workspace(tmp_path / "other")
    other.env["HUBWORKS_PUBLISH_URL"] = str(share)  # a plain path works too
    other.add_recipe("data")
    before = (share / "noarch" / "tool-1.0.0-h4616a5c_0.conda").stat().st_mtime_ns
    assert "published 1 package(s)" in other.doit("publish_channel").output
    repodata = json.loads((share / "noarch" / "repodata.json").read_text())
    assert sorted(repodata["packages.conda"]) == [
        "data-1.0.0-h4616a5c_0.conda", "report-kit-1.0.0-h4616a5c_0.conda",
        "tool-1.0.0-h4616a5c_0.conda"]
    assert (share / "noarch" / "tool-1.0.0-h4616a5c_0.conda").stat().st_mtime_ns == before


def test_an_s3_prefix_is_checked_before_any_upload(workspace, s3_store):
    ws = workspace
    ws.add_recipe("tool")
    bucket = s3_store.make_bucket("office-channel")
    refused = {
        "x/../..": "has a '..' part in its prefix",     # rattler would index the bucket root
        "a//b": "has an empty part (//) in its prefix",
        "conda#latest": "has a '#' or '?'",
        "conda?v=1": "has a '#' or '?'",
        "my channel": "spell differently (' ')",  # rattler's keys say my%20channel
        "my%20channel": "spell differently ('%')",
    }
    for prefix, why in refused.items():
        s3_store.configure(ws, f"s3://{bucket}/{prefix}")
        run = ws.doit("publish_channel", check=False)
        assert run.returncode != 0
        assert run.output.count("fix:") == 1 and "Traceback" not in run.output, run.output
        assert f"publish.url 's3://{bucket}/{prefix}' has " in run.output, run.output
        assert why in run.output, run.output
        assert "fix: write the prefix with only letters, digits and - _ . ~" in run.output
        assert s3_store.keys(bucket) == []

    # What the rule allows: the packages and every index file under the same prefix.
    s3_store.configure(ws, f"s3://{bucket}/team-a/conda.v1_~x/")
    ws.doit("publish_channel")
    keys = s3_store.keys(bucket)
    assert "team-a/conda.v1_~x/noarch/tool-1.0.0-h4616a5c_0.conda" in keys
    assert "team-a/conda.v1_~x/noarch/repodata_shards.msgpack.zst" in keys
    assert all(key.startswith("team-a/conda.v1_~x/noarch/") for key in keys), keys
    assert published_names(s3_store, bucket, "team-a/conda.v1_~x") == ws.packages()


def test_an_s3_index_error_shows_the_store_code_and_message(workspace, s3_store):
    ws = workspace
    ws.add_recipe("tool")
    bucket = s3_store.make_bucket("office-channel")
    key_id, secret = s3_store.iam_user("publisher", bucket)
    s3_store.enforce_iam()
    # moto's IAM checks take boto3's requests and refuse the signature of rattler's listing:
    # the packages go up, the index fails with an answer of the store.
    s3_store.configure(ws, f"s3://{bucket}/conda", AWS_ACCESS_KEY_ID=key_id,
                       AWS_SECRET_ACCESS_KEY=secret)
    run = ws.doit("publish_channel", check=False)
    assert run.returncode != 0
    assert run.output.count("fix:") == 1 and "Traceback" not in run.output, run.output
    assert (f"rattler could not index s3://{bucket}/conda (endpoint {s3_store.endpoint}): "
            f"the store answered SignatureDoesNotMatch: The request signature we calculated "
            f"does not match the signature you provided.") in run.output, run.output
    assert "(its list request)" in run.output
    assert "headers" not in run.output and "x-amzn-requestid" not in run.output


def share_files(share) -> dict[str, int]:
    """Every file under ``share`` with its size, the lock file apart (empty by nature)."""
    return {str(path.relative_to(share)): path.stat().st_size for path in share.rglob("*")
            if path.is_file() and path.name != ".hubworks-publish.lock"}


def index_lists(share, names: set[str]) -> bool:
    """Every index file of the share's noarch lists exactly ``names``, each shard there."""
    noarch = share / "noarch"
    repodata = json.loads((noarch / "repodata.json").read_text())
    zst = json.loads(zstandard.ZstdDecompressor().decompressobj().decompress(
        (noarch / "repodata.json.zst").read_bytes()))
    shards = msgpack.unpackb(zstandard.ZstdDecompressor().decompressobj().decompress(
        (noarch / "repodata_shards.msgpack.zst").read_bytes()))["shards"]
    return ({r["name"] for r in repodata["packages.conda"].values()} == names
            and {r["name"] for r in zst["packages.conda"].values()} == names
            and set(shards) == names
            and all((noarch / "shards" / f"{bytes(d).hex()}.msgpack.zst").is_file()
                    for d in shards.values()))


@pytest.fixture
def read_only(tmp_path):
    """Make a folder read-only for everyone, root included (a read-only bind mount)."""
    mounted = []

    def make(folder):
        if os.geteuid() != 0:
            pytest.skip("a bind mount needs root")
        subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
        mounted.append(folder)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)

    def undo():
        while mounted:
            subprocess.run(["umount", str(mounted.pop())], check=True)

    make.undo = undo
    yield make
    undo()


def test_a_read_only_folder_target_is_one_message(workspace, tmp_path, read_only):
    ws = workspace
    ws.add_recipe("tool")
    share = tmp_path / "share"
    share.mkdir()
    ws.env["HUBWORKS_PUBLISH_URL"] = share.as_uri()
    ws.doit("publish_channel")
    ws.add_recipe("data")
    ws.doit("build_recipes")
    before = share_files(share)

    read_only(share)
    run = ws.doit("publish_channel", check=False)
    assert run.returncode != 0
    assert run.output.count("fix:") == 1 and "Traceback" not in run.output, run.output
    assert (f"the publish target {share.as_uri()} is not writable: Read-only file system"
            in run.output), run.output
    assert "fix: mount the share read-write, or make the folder writable" in run.output
    assert share_files(share) == before

    read_only.undo()
    assert "published 1 package(s)" in ws.doit("publish_channel").output
    assert index_lists(share, {"tool", "data"})


@pytest.mark.parametrize("room", [0, 1], ids=["no-room-for-repodata", "room-for-repodata"])
def test_a_folder_target_that_fills_up_while_indexing(workspace, small_share, room):
    ws = workspace
    ws.add_recipe("tool")
    ws.env["HUBWORKS_PUBLISH_URL"] = small_share.as_uri()
    ws.doit("publish_channel")
    ws.add_recipe("data")
    ws.doit("build_recipes")
    [data] = [name for name in ws.packages() if name.startswith("data-")]

    # Fill the share, then free the pages the new package takes and ``room`` more: the
    # package fits, and the index runs out of space (with room=1, after repodata.json).
    filler = small_share / "filler"
    with filler.open("wb", buffering=0) as handle:
        for size in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    handle.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    pages = -(-(ws.channel / "noarch" / data).stat().st_size // 4096) + room
    os.truncate(filler, filler.stat().st_size - pages * 4096)

    run = ws.doit("publish_channel", check=False)
    assert run.returncode != 0
    assert run.output.count("fix:") == 1 and "Traceback" not in run.output, run.output
    assert (f"{small_share.as_uri()} ran out of space while it was indexed: its packages are "
            f"there, but its index does not list them all yet") in run.output, run.output
    assert "fix: free space on the share (or raise its quota)" in run.output
    assert not [name for name, size in share_files(small_share).items() if size == 0]
    assert not (small_share / ".tmp").exists()
    assert not index_lists(small_share, {"tool", "data"})

    # Still full: the next run is not up to date, and says the same.
    again = ws.doit("publish_channel", check=False)
    assert "publish_channel" in again.executed and again.returncode != 0
    filler.unlink()
    ws.doit("publish_channel")
    assert index_lists(small_share, {"tool", "data"})
    assert "publish_channel" in ws.doit("publish_channel").up_to_date


def test_a_folder_target_with_a_linked_subdir_is_refused(workspace, tmp_path):
    ws = workspace
    ws.add_recipe("tool")
    share, elsewhere = tmp_path / "share", tmp_path / "elsewhere" / "noarch"
    share.mkdir()
    elsewhere.mkdir(parents=True)
    (share / "noarch").symlink_to(elsewhere)
    ws.env["HUBWORKS_PUBLISH_URL"] = share.as_uri()
    run = ws.doit("publish_channel", check=False)
    assert run.returncode != 0
    assert run.output.count("fix:") == 1 and "Traceback" not in run.output, run.output
    assert (f"the publish target {share.as_uri()} has a link where a subdir belongs: "
            f"noarch -> {elsewhere}") in run.output, run.output
    assert f"fix: replace the link {share / 'noarch'} with the folder it points to" \
        in run.output
    assert list(elsewhere.iterdir()) == [] and share_files(share) == {}


def test_a_folder_publish_never_overwrites_a_package_that_appeared_meanwhile(workspace,
                                                                            tmp_path):
    ws = workspace
    ws.add_recipe("tool")
    ws.doit("build_recipes")
    [name] = ws.packages()
    ours = (ws.channel / "noarch" / name).read_bytes()
    theirs = package_as(ws.channel / "noarch" / name, tmp_path).read_bytes()  # same name
    assert theirs != ours
    share = tmp_path / "share"
    (share / "noarch").mkdir(parents=True)
    # Our package comes through a pipe: the test decides when its copy is written.
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)

    def publish_theirs_meanwhile():
        with pipe.open("wb") as source:
            source.write(ours[:1000])
            source.flush()
            deadline = time.monotonic() + 30
            while not list((share / "noarch").glob(".*.partial")):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            (share / "noarch" / name).write_bytes(theirs)  # another publisher, done first
            source.write(ours[1000:])

    other = threading.Thread(target=publish_theirs_meanwhile)
    other.start()
    written = FolderTarget(share, share.as_uri()).put_new(
        LocalPackage(f"noarch/{name}", pipe, len(ours), "", ""))
    other.join()
    assert written is False
    assert (share / "noarch" / name).read_bytes() == theirs
    assert [p.name for p in (share / "noarch").iterdir()] == [name]

    # publish_channel then keeps their copy and says so.
    ws.env["HUBWORKS_PUBLISH_URL"] = share.as_uri()
    run = ws.doit("publish_channel")
    assert f"kept the copies {share.as_uri()} has of 1 package(s)" in run.output
    assert (share / "noarch" / name).read_bytes() == theirs
