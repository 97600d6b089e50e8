"""S3 for tests: moto's standalone server on loopback, a bucket, and a workspace set to it.

moto's server is a real S3 endpoint over HTTP (signatures, conditional writes, bucket
policies, and IAM checks once switched on); it runs on a thread of the test process and
keeps its state there, reset before each test. Import the fixtures into a test module:
``from tests.s3_fixtures import moto_endpoint, s3_store  # noqa: F401``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import pytest

from tests.conftest import free_port

ACCESS_KEY = "hubworks-test"
SECRET_KEY = "hubworks-test-secret"
REGION = "us-east-1"


@dataclass
class S3Store:
    endpoint: str
    client: object  # a boto3 S3 client with full rights

    def make_bucket(self, name: str, *, public_read: bool = True) -> str:
        self.client.create_bucket(Bucket=name)
        if public_read:  # what a bucket serving conda clients and image builds needs
            self.client.put_bucket_policy(Bucket=name, Policy=json.dumps({
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject",
                               "Resource": f"arn:aws:s3:::{name}/*"}]}))
        return name

    def keys(self, bucket: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def repodata(self, bucket: str, key: str) -> dict:
        return json.loads(self.client.get_object(Bucket=bucket, Key=key)["Body"].read())

    def iam_user(self, name: str, bucket: str) -> tuple[str, str]:
        """A moto IAM user allowed everything in ``bucket``; its key id and secret."""
        import boto3

        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name=REGION,
                           aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName="bucket", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*",
                           "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}]}))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    def enforce_iam(self) -> None:
        """From now on requests are checked against moto's IAM users and policies."""
        import requests

        requests.post(f"{self.endpoint}/moto-api/reset-auth", data=b"0", timeout=10)

    def configure(self, ws, url: str, **extra: str) -> None:
        """Point a test workspace's publish settings and AWS credentials at this store."""
        ws.env.update({"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                       # nothing of this machine's own AWS configuration
                       "AWS_CONFIG_FILE": str(ws.root / "no-aws-config"),
                       "AWS_SHARED_CREDENTIALS_FILE": str(ws.root / "no-aws-credentials"),
                       "HUBWORKS_PUBLISH_URL": url,
                       "HUBWORKS_PUBLISH_ENDPOINT_URL": self.endpoint,
                       "HUBWORKS_PUBLISH_REGION": REGION,
                       "HUBWORKS_PUBLISH_FORCE_PATH_STYLE": "true"})
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
            ws.env.pop(name, None)
        ws.env.update(extra)


@pytest.fixture(scope="session")
def moto_endpoint():
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(),
                                            verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_store(moto_endpoint) -> S3Store:
    """moto's S3 server, emptied, with IAM checks off (any key pair is accepted)."""
    import boto3
    import requests

    requests.post(f"{moto_endpoint}/moto-api/reset-auth", data=b"inf", timeout=10)
    requests.post(f"{moto_endpoint}/moto-api/reset", timeout=10)
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name=REGION,
                          aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)
    return S3Store(moto_endpoint, client)
