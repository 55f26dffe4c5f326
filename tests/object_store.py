"""An S3-compatible object store on 127.0.0.1 for tests and benchmarks: moto's standalone server.

``moto_s3()`` starts ``moto_server`` as a subprocess on a free loopback port, waits until it
answers, points the AWS_* environment variables at it (fsspec/s3fs, pyarrow's S3FileSystem, boto3,
MLflow, and every subprocess or Ray worker started meanwhile read them; nothing else needs an
endpoint setting), creates a bucket and restores the environment when it ends. The ``s3_store``
fixture is the same server for the whole test session. Benchmarks import this module after putting
``tests/`` on sys.path.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from ports import free_port

# Dummy credentials: moto accepts any; real deployments set these variables themselves.
_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass(frozen=True)
class S3Store:
    """A running S3-compatible server and one bucket on it."""

    endpoint: str  # http://127.0.0.1:PORT, also in AWS_ENDPOINT_URL while the store runs
    bucket: str

    def url(self, path: str = "") -> str:
        """``s3://<bucket>/<path>``."""
        return f"s3://{self.bucket}/{path.lstrip('/')}".rstrip("/")

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under ``prefix`` (bucket-relative), sorted."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint)
        keys: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys += [item["Key"] for item in page.get("Contents", [])]
        return sorted(keys)


def _wait_until_up(endpoint: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto_server exited with status {process.returncode} before answering")
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    raise RuntimeError(f"moto_server did not answer on {endpoint} within {timeout_s:.0f} s")


@contextlib.contextmanager
def moto_s3(bucket: str = "magnet", timeout_s: float = 60.0) -> Iterator[S3Store]:
    """Run moto's S3 server on 127.0.0.1 with ``bucket`` created and AWS_* pointed at it."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = Path(sys.executable).with_name("moto_server")
    process = subprocess.Popen(
        [str(server), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    saved = {name: os.environ.get(name) for name in (*_ENV, "AWS_ENDPOINT_URL")}
    try:
        _wait_until_up(endpoint, process, timeout_s)
        os.environ.update(_ENV, AWS_ENDPOINT_URL=endpoint)
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        yield S3Store(endpoint=endpoint, bucket=bucket)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def s3_store() -> Iterator[S3Store]:
    """One moto S3 server (bucket ``magnet``) for the session; AWS_* point at it meanwhile."""
    with moto_s3() as store:
        yield store
