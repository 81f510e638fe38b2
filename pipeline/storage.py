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
- **the same patience for libraries that write through pyarrow** (:func:`patient_filesystem`: Ray Train
  persists checkpoints and Tune its state through it): pyarrow's own S3 retries give up within seconds;
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


def storage_error(uri: str, what: str, error: BaseException) -> StorageError:
    """A :class:`StorageError` naming ``uri``, ``what`` was being done, and the cause."""
    if isinstance(error, OSError) and error.errno in errno.errorcode:
        cause = f"{error.strerror or error} ({errno.errorcode[error.errno]})"
    else:
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return StorageError(f"{uri}: cannot {what}: {cause}")


def retrying(uri: str, what: str, operation: Callable[[], T], budget_s: float | None = None) -> T:
    """``operation()`` on the object store holding ``uri``, retried with growing pauses while it fails for
    a transient reason, for up to ``budget_s`` seconds (default: ``VITFLOW_STORAGE_RETRY_S``); past it a
    :class:`StorageError` naming ``uri`` and ``what``."""
    budget = retry_budget_s() if budget_s is None else budget_s
    deadline, pause = time.monotonic() + budget, 0.5
    while True:
        try:
            return operation()
        except OSError as error:
            if not is_transient(error):
                raise
            if time.monotonic() + pause > deadline:
                raise storage_error(uri, f"{what} (still failing after {budget:.0f} s of retries, {RETRY_ENV})", error) from error
            time.sleep(pause)
            pause = min(pause * 2, 10.0)


def _put(fs: pafs.FileSystem, path: str, source: str | os.PathLike[str]) -> None:
    """Upload a local file to ``path`` whole: an object store shows it only once every byte has arrived."""
    with open(source, "rb") as local, fs.open_output_stream(path) as remote:
        shutil.copyfileobj(local, remote, _CHUNK)


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
        return storage_error(self.uri, what, error)

    def retrying(self, what: str, operation: Callable[[], T]) -> T:
        """``operation()``, retried while it fails for a transient reason on an object store, within the
        retry budget; past it a :class:`StorageError` naming this location and ``what``."""
        return operation() if self.local else retrying(self.uri, what, operation)

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
        self.retrying("upload it", lambda: _put(self.fs, self.path, source))

    def write_bytes(self, data: bytes) -> None:
        with self.writing() as tmp:
            tmp.write_bytes(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def delete(self) -> None:
        """Remove the file; nothing to do when it is already gone."""
        with contextlib.suppress(FileNotFoundError):
            self.retrying("delete it", lambda: self.fs.delete_file(self.path))


def patient_filesystem(uri: str, budget_s: float | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path in it) for a store that other libraries write through (Ray Train's and Tune's
    ``storage_filesystem``): a local folder as is; an object store behind :class:`PatientHandler`, so
    that each of their operations waits out an outage like this module's own do."""
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        return fs, path
    return pafs.PyFileSystem(PatientHandler(uri, retry_budget_s() if budget_s is None else budget_s)), path


class PatientHandler(pafs.FileSystemHandler):
    """An object store's pyarrow filesystem whose every operation is retried whole (see :func:`retrying`),
    for code that is not ours: Ray Train persists checkpoints and Tune its state through it.

    What pyarrow's own S3 retries lack: they retry one HTTP request a few times within seconds (3 attempts
    by default), and ``S3FileSystem`` drops a ``retry_strategy`` when it is pickled (its ``__reduce__``
    omits it; Ray ships the filesystem to every worker), so a checkpoint upload during a 30 s outage
    fails. Here each operation, the opening of a file to write included (it starts the upload), is
    retried within the budget; a file being written appears in the store only when closed whole (one
    PUT, or a multipart upload completed), so no reader takes a partial checkpoint file; an outage that
    begins in the middle of one file's upload fails that upload with an error (Ray Train then restarts
    from the last checkpoint, ``max_failures``). A read first downloads the whole file. The handler
    pickles as its URI and budget: the store's filesystem is made again in each process from that
    machine's environment (endpoint, credentials), never shipped.
    """

    def __init__(self, uri: str, budget_s: float):
        self.uri, self.budget_s = uri.rstrip("/"), budget_s
        self.scheme = uri.split("://", 1)[0]
        self._fs: pafs.FileSystem | None = None

    def __getstate__(self) -> dict:
        return {"uri": self.uri, "budget_s": self.budget_s, "scheme": self.scheme}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _fs=None)

    @property
    def fs(self) -> pafs.FileSystem:
        if self._fs is None:
            self._fs, _ = filesystem(self.uri)
        return self._fs

    def _retry(self, path: str, what: str, operation: Callable[[], T]) -> T:
        return retrying(f"{self.scheme}://{path}", what, operation, self.budget_s)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PatientHandler) and (other.uri, other.budget_s) == (self.uri, self.budget_s)

    def equals(self, other: object) -> bool:
        return self == other

    def get_type_name(self) -> str:
        return f"vitflow-patient-{self.scheme}"

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self._retry(paths[0] if paths else self.uri, "look it up", lambda: self.fs.get_file_info(paths))

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self._retry(selector.base_dir, "list it", lambda: self.fs.get_file_info(selector))

    def create_dir(self, path: str, recursive: bool) -> None:
        self._retry(path, "create it", lambda: self.fs.create_dir(path, recursive=recursive))

    def delete_dir(self, path: str) -> None:
        self._retry(path, "delete it", lambda: self.fs.delete_dir(path))

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._retry(path, "empty it", lambda: self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok))

    def delete_root_dir_contents(self) -> None:
        raise StorageError(f"{self.uri}: refusing to delete everything in the store")

    def delete_file(self, path: str) -> None:
        self._retry(path, "delete it", lambda: self.fs.delete_file(path))

    def move(self, src: str, dest: str) -> None:
        self._retry(src, f"move it to {dest}", lambda: self.fs.move(src, dest))

    def copy_file(self, src: str, dest: str) -> None:
        self._retry(src, f"copy it to {dest}", lambda: self.fs.copy_file(src, dest))

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return self._downloaded(path)

    def open_input_file(self, path: str) -> pa.NativeFile:
        return self._downloaded(path)

    def open_output_stream(self, path: str, metadata: dict | None) -> pa.NativeFile:
        # The store's own stream (opening it starts the upload: that is what waits out an outage). Not a
        # Python stream that uploads when closed: pyarrow.fs.copy_files, which Ray persists checkpoints
        # with, drops an error raised by a Python stream's close(), and a failed upload would pass.
        return self._retry(path, "write it", lambda: self.fs.open_output_stream(path, metadata=metadata))

    def open_append_stream(self, path: str, metadata: dict | None) -> pa.NativeFile:
        raise StorageError(f"{self.scheme}://{path}: an object store cannot append to a file")

    def _downloaded(self, path: str) -> pa.NativeFile:
        handle, tmp = tempfile.mkstemp(prefix="vitflow-download-")
        os.close(handle)
        try:
            def download() -> None:
                with self.fs.open_input_stream(path, compression=None, buffer_size=READ_AHEAD) as remote, \
                        open(tmp, "wb") as local:
                    shutil.copyfileobj(remote, local, _CHUNK)

            self._retry(path, "read it", download)
            return pa.OSFile(tmp, "rb")  # readable after the unlink below, until closed
        finally:
            os.unlink(tmp)

