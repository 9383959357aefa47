"""An S3-compatible server on 127.0.0.1: moto's server mode, which speaks the S3 protocol to real
clients (boto3 in MLflow's server, s3fs in dvc-s3, the AWS CLI). Credentials reach every client
through the usual AWS variables; the secret key is new for each server, so that the tests can
look for it wherever it must not be."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from testbed import VENV_BIN, free_port
from tests.support.servers import background

ACCESS_KEY_ID = "AKIABIGRAMTESTS00001"
REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    secret_key: str

    @property
    def credentials(self) -> dict[str, str]:
        """The AWS variables every S3 client reads (boto3, s3fs, the AWS CLI)."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
        }

    def client(self):
        import boto3  # only where a test talks to the server

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=self.secret_key,
            region_name=REGION,
        )

    def new_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object's key under prefix, as S3's ListObjectsV2 pages them."""
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        return [item["Key"] for page in pages for item in page.get("Contents", [])]


@contextlib.contextmanager
def s3_server(workdir: Path) -> Iterator[S3Server]:
    port = free_port()
    cmd = [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    env = {"PATH": os.environ["PATH"], "HOME": str(workdir)}
    with background(cmd, f"http://127.0.0.1:{port}/moto-api/", workdir / "moto.log", env):
        yield S3Server(f"http://127.0.0.1:{port}", secrets.token_urlsafe(30))
