"""publish_channel against real targets: moto's S3 server on loopback, and a plain folder.

The story: build and index recipes, publish, install from the published channel with a
real conda client (py-rattler); publish again and nothing is copied; two publishers at
once both end indexed; bad input gets one message naming the target and the fix, and a
package that failed to upload is in no index.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import DODO, Workspace, free_port
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
    shutil.copy(noarch / "tool-1.0.0-h4616a5c_1.conda", noarch / "tool-1.0.0-h4616a5c_0.conda")
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
