"""Where datasets live: a local folder or an object-store prefix, addressed by one string.

``pyarrow.fs`` does the work: local disk, ``s3://`` (and S3-compatible servers), ``gs://``, ``hdfs://``;
any other scheme fsspec knows (``memory://``, ...) is wrapped as a pyarrow filesystem. Endpoint and
credentials come from the standard environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``GOOGLE_APPLICATION_CREDENTIALS``, ...), never from a config file.

What pyarrow lacks and this module adds:

- **writes no reader sees half of**: a file is written to a local temporary file first, then moved into
  place by a rename (local disk) or uploaded whole (an object store shows an object only when its PUT, or
  every part of its multipart upload, has arrived);
- **one error type naming the location** (:class:`StorageError`), whatever the filesystem raised;
- **patience with an object store that goes away**: an operation that fails for a transient reason (no
  connection, a timeout, HTTP 5xx, throttling) is retried with growing pauses for up to
  ``VITFLOW_STORAGE_RETRY_S`` seconds (default 300), then fails naming the URI. Whole operations are
  retried (a read from the start, an upload of the whole local file), so nothing partial is ever kept.
  Refused keys, a missing bucket or object, and local disks are never retried; :meth:`Location.check_bucket`
  (what a run checks first) answers at once.
- **paths that stay URIs**: ``Location("s3://b/data") / "train/x.tar"`` is ``s3://b/data/train/x.tar``,
  never a local folder named ``s3:``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import posixpath
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs

_CHUNK = 1 << 20
READ_AHEAD = 8 << 20
RETRY_ENV = "VITFLOW_STORAGE_RETRY_S"
_TRANSIENT = ("NETWORK_CONNECTION", "curlCode", "SERVICE_UNAVAILABLE", "SLOW_DOWN", "THROTTLING", "INTERNAL_FAILURE",
              "REQUEST_TIMEOUT", "Timeout", "timed out", "HTTP status 5", "Connection reset", "Broken pipe")
T = TypeVar("T")


def retry_budget_s() -> float:
    value = os.environ.get(RETRY_ENV, "300")
    try:
        budget = float(value)
    except ValueError:
        raise StorageError(f"{RETRY_ENV}={value!r}: not a number of seconds") from None
    if budget < 0:
        raise StorageError(f"{RETRY_ENV}={value!r}: must be 0 or more seconds")
    return budget


def is_transient(error: OSError) -> bool:
    """A failure worth waiting out (the store away or overloaded), not one that waiting cannot fix."""
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    text = str(error)
    return any(marker in text for marker in _TRANSIENT)


class StorageError(OSError):
    """A location cannot be read or written: the message names it and the cause."""


def is_uri(location: str | os.PathLike[str]) -> bool:
    """A URI (``s3://...``) rather than a local path."""
    return "://" in str(location)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding ``uri`` and the path within it (no trailing slash)."""
    if not is_uri(uri):
        return pafs.LocalFileSystem(), posixpath.abspath(os.fspath(uri))
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except pa.ArrowInvalid:  # a scheme pyarrow has no native filesystem for: try fsspec
        import fsspec

        try:
            fsspec_fs, path = fsspec.core.url_to_fs(uri)
        except (ImportError, ValueError) as error:
            raise StorageError(f"{uri}: no filesystem for this URI ({error})") from None
        fs = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec_fs))
    except OSError as error:  # e.g. an S3 region lookup that cannot reach the endpoint
        raise StorageError(f"{uri}: cannot open its filesystem ({error})") from None
    return fs, path.rstrip("/") or "/"


class Location:
    """A file or folder by URI (or absolute local path), with the few operations datasets need."""

    def __init__(self, uri: str | os.PathLike[str], *, _fs: pafs.FileSystem | None = None, _path: str | None = None):
        if _fs is None:
            _fs, _path = filesystem(os.fspath(uri))
        self.fs, self.path = _fs, _path
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.uri = self.path if self.local else os.fspath(uri).rstrip("/")

    def __truediv__(self, relative: str) -> Location:
        relative = relative.strip("/")
        return Location(posixpath.join(self.uri, relative), _fs=self.fs, _path=posixpath.join(self.path, relative))

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    def error(self, what: str, error: BaseException) -> StorageError:
        """A :class:`StorageError` naming this location, ``what`` was being done, and the cause."""
        if isinstance(error, OSError) and error.errno in errno.errorcode:
            cause = f"{error.strerror or error} ({errno.errorcode[error.errno]})"
        else:
            cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return StorageError(f"{self.uri}: cannot {what}: {cause}")

    def retrying(self, what: str, operation: Callable[[], T]) -> T:
        """``operation()``, retried while it fails for a transient reason on an object store, within the
        retry budget; past it a :class:`StorageError` naming this location and ``what``."""
        if self.local:
            return operation()
        budget = retry_budget_s()
        deadline, pause = time.monotonic() + budget, 0.5
        while True:
            try:
                return operation()
            except OSError as error:
                if not is_transient(error):
                    raise
                if time.monotonic() + pause > deadline:
                    raise self.error(f"{what} (still failing after {budget:.0f} s of retries, {RETRY_ENV})", error) from error
                time.sleep(pause)
                pause = min(pause * 2, 10.0)

    # --- reading ---------------------------------------------------------------------------------

    def info(self) -> pafs.FileInfo:
        return self.retrying("look it up", lambda: self.fs.get_file_info(self.path))

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self.info().type == pafs.FileType.Directory

    def size(self) -> int:
        info = self.info()
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(errno.ENOENT, "not found", self.uri)
        return info.size

    def children(self) -> list[Location]:
        """What the folder holds, one level down (an empty list when it does not exist)."""
        try:
            found = self.retrying("list it", lambda: self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True)))
        except NotADirectoryError:
            return []
        return [Location(posixpath.join(self.uri, posixpath.basename(i.path)), _fs=self.fs, _path=i.path)
                for i in sorted(found, key=lambda i: i.path)]

    def open(self) -> IO[bytes]:
        """A binary input stream, read ahead in large blocks (an object store answers each read with a
        request); ``FileNotFoundError`` when there is no such file."""
        return self.fs.open_input_stream(self.path, compression=None, buffer_size=READ_AHEAD)

    def read_bytes(self) -> bytes:
        def read() -> bytes:
            with self.open() as stream:
                return stream.read()

        return self.retrying("read it", read)

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def sha256(self) -> str:
        def digest() -> str:
            hashed = hashlib.sha256()
            with self.open() as stream:
                while chunk := stream.read(_CHUNK):
                    hashed.update(chunk)
            return hashed.hexdigest()

        return self.retrying("read it", digest)

    def check_bucket(self) -> None:
        """On an object store, fail unless the bucket exists: some servers (SeaweedFS) create a bucket on
        the first write, which would hide a misspelt name until the data went somewhere unexpected."""
        if self.local or isinstance(self.fs, pafs.PyFileSystem):
            return
        bucket = self.path.split("/", 1)[0]
        try:
            found = self.fs.get_file_info(bucket).type
        except OSError as error:
            raise self.error("reach its store", error) from None
        if found != pafs.FileType.Directory:
            raise StorageError(f"{self.uri}: bucket {bucket!r} does not exist (create it first)")

    # --- writing ---------------------------------------------------------------------------------

    def mkdir(self) -> None:
        """Create the folder (and its parents) on a local disk; object stores have no folders to make."""
        if self.local:
            self.fs.create_dir(self.path, recursive=True)

    @contextlib.contextmanager
    def writing(self) -> Iterator[Path]:
        """A local temporary file to fill; when the block ends without error it becomes this file whole
        (a rename on the same disk, or one upload), and on error it is removed and nothing is published."""
        if self.local:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            directory = posixpath.dirname(self.path)
        else:
            directory = None  # the machine's temp folder
        handle, tmp = tempfile.mkstemp(prefix=f".{self.name}.tmp-", dir=directory)
        os.close(handle)
        try:
            yield Path(tmp)
            if self.local:
                os.replace(tmp, self.path)
            else:
                self.upload(Path(tmp))
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def upload(self, source: Path) -> None:
        """Copy a finished local file here in one upload (the whole upload again after a transient failure)."""
        def put() -> None:
            with open(source, "rb") as local, self.fs.open_output_stream(self.path) as remote:
                shutil.copyfileobj(local, remote, _CHUNK)

        self.retrying("upload it", put)

    def write_bytes(self, data: bytes) -> None:
        with self.writing() as tmp:
            tmp.write_bytes(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def delete(self) -> None:
        """Remove the file; nothing to do when it is already gone."""
        with contextlib.suppress(FileNotFoundError):
            self.retrying("delete it", lambda: self.fs.delete_file(self.path))
