"""Target 14: uploading to S3 through the team's tracking server, against uploading directly.

A team's `mlflow server --serve-artifacts --artifacts-destination s3://...` takes every artifact
the stages log over HTTP and puts it into the bucket itself, so that clients need no S3
credentials. What that hop costs is measured on one S3-compatible server on 127.0.0.1 (moto's,
as in the tests): the same file logged as an artifact through the tracking server (MLflow's
client, as the stages log) and uploaded with boto3 straight to the same server (the reference).
The sizes are a small and a baby GPT's model.pt and a full GPT's (about 43 MB).
"""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path

from benchmarks.measure import Row, fmt_seconds, interleaved_medians
from testbed import mlflow_server, s3_server

SIZES_MB = (1, 13, 43)


def s3_rows(scratch: Path, repeats: int) -> list[Row]:
    from mlflow import MlflowClient

    with s3_server(scratch) as s3:
        bucket = s3.new_bucket("bench")
        server_env = {**os.environ, **s3.credentials, "MLFLOW_S3_ENDPOINT_URL": s3.endpoint}
        backend = f"sqlite:///{scratch / 's3-bench-mlflow.db'}"
        with mlflow_server(backend, scratch, server_env, f"s3://{bucket}/mlflow") as url:
            client = MlflowClient(tracking_uri=url)
            run_id = client.create_run(client.create_experiment("s3-bench")).info.run_id
            direct = s3.client()
            rows = []
            uploads = itertools.count()  # Every upload to a new key, as every run's are.
            for size_mb in SIZES_MB:
                path = scratch / f"model-{size_mb}mb.pt"
                path.write_bytes(os.urandom(size_mb * 10**6))

                def through_server(path: Path = path) -> None:
                    client.log_artifact(run_id, str(path), f"upload-{next(uploads)}")

                def with_boto3(path: Path = path) -> None:
                    direct.upload_file(str(path), bucket, f"direct/{next(uploads)}/{path.name}")

                medians = interleaved_medians(
                    {"boto3": with_boto3, "server": through_server}, repeats
                )
                rows.append(_row(size_mb, medians["boto3"], medians["server"]))
    return rows


def _row(size_mb: int, direct_s: float, server_s: float) -> Row:
    return Row(
        "14 s3",
        f"a {size_mb} MB upload: boto3 straight to the S3 server vs log_artifact through "
        "`mlflow server --serve-artifacts` to it",
        f"{fmt_seconds(direct_s)} ({size_mb / direct_s:.0f} MB/s)",
        f"{fmt_seconds(server_s)} ({size_mb / server_s:.0f} MB/s)",
        f"{server_s / direct_s:.2f}x",
    )


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="bigram-bench-s3-") as directory:
        from benchmarks.measure import format_table

        print(format_table(s3_rows(Path(directory), 3)))
