"""Datasets in object storage: fetch their small files, publish a prepared dataset, explain failures.

Everything goes through mosaicml-streaming's own storage clients, so every
scheme it supports works (`s3://`, `gs://`, `oci://`, `hf://`, `azure://`,
...) with the same configuration it documents. For S3 and S3-compatible
stores (MinIO, Ceph, R2, a local test server) that is:

- the endpoint from `S3_ENDPOINT_URL` (or boto's own `AWS_ENDPOINT_URL`);
- credentials the way boto finds them: `AWS_ACCESS_KEY_ID` /
  `AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE` with `~/.aws/credentials`, an
  instance role.

looptrain never reads, copies or prints a credential: recipes hold only the
URI, and a failed request becomes one line naming the URI, the endpoint and
what to fix (`RemoteError`, a DataError, so exit status 2 from the CLI).
"""

from __future__ import annotations

import os
import shutil
import urllib.parse
from pathlib import Path


from looptrain.data.errors import DataError

DEFAULT_TIMEOUT_S = 60.0


class RemoteError(DataError):
    """A remote dataset cannot be reached, read or written; the message names the URI and the fix."""

    def __init__(self, message: str, *, not_found: bool = False):
        super().__init__(message)
        self.not_found = not_found  # the object (or bucket) does not exist, as opposed to a failure


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` is a URI of an object store (a scheme of two or more letters, not file://)."""
    scheme = urllib.parse.urlparse(os.fspath(path)).scheme
    return len(scheme) > 1 and scheme != "file"


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def _endpoint(uri: str) -> str:
    if urllib.parse.urlparse(uri).scheme == "s3":
        endpoint = os.environ.get("S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
        return f" at {endpoint}" if endpoint else " (AWS; set S3_ENDPOINT_URL for another S3-compatible store)"
    return ""


def explain(err: BaseException, uri: str, what: str = "") -> RemoteError:
    """One line for a failed request to `uri`: what went wrong and what to do.

    Only exception types and error codes are read, never request details, so
    nothing secret can end up in the message.
    """
    name = type(err).__name__
    code = ""
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
    where = _endpoint(uri)
    if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
        return RemoteError(
            f"{uri}: no credentials for the object store{where}; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE / ~/.aws/credentials)"
        )
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ReadTimeoutError",
                "ProxyConnectionError", "ConnectionError", "SSLError"):
        return RemoteError(f"{uri}: cannot reach the object store{where} ({name}); check the endpoint and network")
    if code == "NoSuchBucket":
        bucket = urllib.parse.urlparse(uri).netloc
        return RemoteError(f"{uri}: bucket {bucket!r} does not exist{where}; create it or fix the URI")
    if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"):
        return RemoteError(
            f"{uri}: access denied by the object store{where} ({code}); check the credentials and the bucket policy"
        )
    if code in ("404", "NoSuchKey") or isinstance(err, FileNotFoundError):
        return RemoteError(f"{uri}: not found{where}{'; ' + what if what else ''}", not_found=True)
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return RemoteError(f"{uri}: {what or 'request failed'}{where} ({name}{': ' + first[:200] if first else ''})")


def _check_reachable(uri: str, timeout: float = 10.0) -> None:
    """Fail at once on a custom S3 endpoint that refuses connections (boto would retry for ~30 s)."""
    endpoint = os.environ.get("S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
    if urllib.parse.urlparse(uri).scheme != "s3" or not endpoint:
        return
    import socket

    parsed = urllib.parse.urlparse(endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname or "", port), timeout=timeout).close()
    except OSError as err:
        raise RemoteError(
            f"{uri}: cannot reach the object store at {endpoint} ({type(err).__name__}); "
            "check S3_ENDPOINT_URL and the network"
        ) from None


def _s3_bucket_missing(uri: str) -> bool:
    """S3 answers a missing object and a missing bucket alike (404) to a download; ask about the bucket."""
    if urllib.parse.urlparse(uri).scheme != "s3":
        return False
    try:
        import boto3

        client = boto3.session.Session().client("s3", endpoint_url=os.environ.get("S3_ENDPOINT_URL"))
        client.head_bucket(Bucket=urllib.parse.urlparse(uri).netloc)
    except Exception as err:  # noqa: BLE001 -- only a definite 404 counts
        response = getattr(err, "response", None)
        return isinstance(response, dict) and str(response.get("Error", {}).get("Code")) in ("404", "NoSuchBucket")
    return False


def _downloader(uri: str):
    from looptrain.data.streaming_import import import_streaming

    import_streaming()
    from streaming.base.storage.download import CloudDownloader

    try:
        return CloudDownloader.get(uri)
    except ValueError as err:
        raise RemoteError(f"{uri}: unsupported remote scheme; use a local path or a URI mosaicml-streaming "
                          "supports (s3://, gs://, oci://, hf://, azure://, ...)") from err


def fetch(uri: str, local: str | os.PathLike, *, missing: str = "", timeout: float = DEFAULT_TIMEOUT_S) -> Path:
    """Download one object to `local` (replaced atomically, so concurrent ranks may fetch the same file)."""
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    partial = local.with_name(f"{local.name}.part-{os.getpid()}")
    partial.unlink(missing_ok=True)
    _check_reachable(uri)
    downloader = _downloader(uri)
    try:
        downloader.download(uri, str(partial), timeout)
    except Exception as err:  # every client has its own error types
        partial.unlink(missing_ok=True)
        problem = explain(err, uri, missing)
        if problem.not_found and _s3_bucket_missing(uri):
            bucket = urllib.parse.urlparse(uri).netloc
            problem = RemoteError(f"{uri}: bucket {bucket!r} does not exist{_endpoint(uri)}; create it or fix the URI")
        raise problem from None
    finally:
        downloader.clean_up()
    os.replace(partial, local)
    return local


def exists(uri: str, scratch: str | os.PathLike) -> bool:
    """Whether the object `uri` exists (fetched into `scratch`; other failures raise RemoteError)."""
    try:
        fetch(uri, scratch)
    except RemoteError as err:
        if err.not_found:
            return False
        raise
    return True


def check_target(uri: str, scratch_dir: str | os.PathLike, *, overwrite: bool) -> None:
    """Refuse to prepare into `uri` when it already holds a dataset (unless overwrite), before any work."""
    scratch = Path(scratch_dir) / ".probe-dataset.json"
    try:
        if exists(join(uri, "dataset.json"), scratch) and not overwrite:
            raise RemoteError(f"{uri}: already holds a dataset; pass --overwrite to replace it or choose another --out")
    finally:
        scratch.unlink(missing_ok=True)


def publish(local_dir: str | os.PathLike, uri: str, *, overwrite: bool, last: str = "dataset.json") -> list[str]:
    """Upload every file below `local_dir` to `uri`, `last` at the end; return the uploaded names.

    A reader treats the remote dataset as finished only when `last`
    (dataset.json) exists, so it is written after everything it describes;
    on overwrite the old one is replaced only at the very end, and readers
    that start in between still see the old, consistent description of
    shards whose names the new index may reuse -- so do not overwrite a
    dataset that a job is reading.
    """
    from looptrain.data.streaming_import import import_streaming

    import_streaming()
    from streaming.base.storage.upload import CloudUploader

    local_dir = Path(local_dir)
    names = sorted(str(p.relative_to(local_dir)) for p in local_dir.rglob("*") if p.is_file())
    names = [n for n in names if n != last] + ([last] if (local_dir / last).is_file() else [])
    check_target(uri, local_dir.parent, overwrite=overwrite)
    import logging

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # streaming warns that the local directory exists: it is meant to
    try:
        uploader = CloudUploader.get((str(local_dir), uri), keep_local=True, exist_ok=True)
    except Exception as err:
        raise explain(err, uri, "cannot write there") from None
    finally:
        logging.disable(previous)
    for name in names:
        try:
            uploader.upload_file(name)
        except Exception as err:
            raise explain(err, join(uri, name), "upload failed") from None
    return names


def remove_tree(path: str | os.PathLike) -> None:
    shutil.rmtree(path, ignore_errors=True)
