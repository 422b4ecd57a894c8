"""Where runs and sweeps keep their files: a local (or NFS) directory, or an object-store prefix
(`s3://bucket/prefix`, `gs://bucket/prefix`).

One small abstraction over `pyarrow.fs`, the filesystem layer Ray Train/Tune use for `storage_path`,
so checkpoints, Tune's experiment state and ermgap's own files (`sweep_state.json`, predictions,
`metrics.json`, the adapter) go to the same place through the same client. A `Location` is a plain
value (a URI and an S3 endpoint): it pickles without credentials and builds its filesystem on the
process that uses it, from that node's credential chain (environment, instance role, workload
identity). Local paths behave exactly like `pathlib` + `ermgap.io` (temp file + rename).

The S3 endpoint of an S3-compatible store (MinIO, Ceph, on-prem) comes from `$AWS_ENDPOINT_URL` on
the driver; it travels inside the Location (and the filesystem handed to Ray), so worker nodes need
only credentials, not the variable.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pyarrow.fs as pafs

from ermgap.errors import ConfigError, OutputExistsError, StorageError
from ermgap.io import (
    OWNER_MARKER,
    atomic_write_bytes,
    check_replaceable,
    claim_dir,
    marker_text,
    refuse_other_kind,
    set_aside,
)

SCHEMES = ("s3", "gs")
ENDPOINT_ENV = "AWS_ENDPOINT_URL"
# A store that does not answer fails the caller within about a minute instead of hanging.
CONNECT_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 60.0


def is_uri(path: str | os.PathLike) -> bool:
    """Whether `path` names an object store (s3://, gs://) rather than a directory on this node."""
    return "://" in str(path) and not str(path).startswith("file://")


@functools.cache
def _filesystem(scheme: str, bucket: str, endpoint: str | None) -> pafs.FileSystem:
    if scheme == "s3":
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region is None:
            # AWS proper: ask the bucket; an S3-compatible endpoint ignores regions.
            region = "us-east-1" if endpoint else pafs.resolve_s3_region(bucket)
        return pafs.S3FileSystem(endpoint_override=endpoint, region=region, connect_timeout=CONNECT_TIMEOUT_S,
                                 request_timeout=REQUEST_TIMEOUT_S,
                                 retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3))
    return pafs.GcsFileSystem(retry_time_limit=timedelta(seconds=REQUEST_TIMEOUT_S))


@dataclass(frozen=True)
class Location:
    """A directory (local) or key prefix (object store). `str(loc)` is what users see and pass back."""

    uri: str                     # absolute local path, or scheme://bucket/key (no trailing slash)
    endpoint: str | None = None  # S3-compatible endpoint (None: the store's default)

    @classmethod
    def of(cls, path: str | os.PathLike | Location, *, endpoint: str | None = None) -> Location:
        if isinstance(path, Location):
            return path
        s = str(path)
        if s.startswith("file://"):
            s = s.removeprefix("file://")
        if not is_uri(s):
            return cls(str(Path(s).expanduser().resolve()))
        scheme, _, rest = s.partition("://")
        scheme = "gs" if scheme.lower() == "gcs" else scheme.lower()
        if scheme not in SCHEMES or not rest.strip("/"):
            raise ConfigError(f"storage {s!r}: expected a local or NFS directory, s3://bucket/prefix or "
                              "gs://bucket/prefix")
        if scheme == "s3" and endpoint is None:
            endpoint = os.environ.get(ENDPOINT_ENV) or None
        return cls(f"{scheme}://{rest.strip('/')}", endpoint if scheme == "s3" else None)

    # ------------------------------------------------------------------ naming
    @property
    def is_remote(self) -> bool:
        return is_uri(self.uri)

    @property
    def path(self) -> str:
        """The path inside the filesystem (`bucket/key` for an object store)."""
        return self.uri.partition("://")[2] if self.is_remote else self.uri

    @property
    def fs(self) -> pafs.FileSystem:
        if not self.is_remote:
            return pafs.LocalFileSystem()
        scheme, _, rest = self.uri.partition("://")
        return _filesystem(scheme, rest.split("/", 1)[0], self.endpoint)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        return Location(self.uri.rsplit("/", 1)[0], self.endpoint)

    @property
    def local(self) -> Path:
        """This location as a local Path (only for local locations)."""
        if self.is_remote:
            raise ValueError(f"{self.uri} is not a local path")
        return Path(self.uri)

    def __truediv__(self, name: str) -> Location:
        return Location(f"{self.uri.rstrip('/')}/{name}", self.endpoint)

    def __str__(self) -> str:
        return self.uri

    def ray_storage(self) -> tuple[str, pafs.FileSystem | None]:
        """(storage_path, storage_filesystem) for Ray Train/Tune's RunConfig and Tuner.restore."""
        return (self.path, self.fs) if self.is_remote else (self.uri, None)

    # ------------------------------------------------------------------ reading
    def _info(self) -> pafs.FileInfo:
        try:
            return self.fs.get_file_info(self.path)
        except OSError as err:
            raise StorageError(f"storage {self.uri}: {err}") from err

    def exists(self) -> bool:
        """A file, or a non-empty prefix (object stores have no empty directories)."""
        info = self._info()
        if info.type == pafs.FileType.File:
            return True
        if info.type == pafs.FileType.Directory:
            return not self.is_remote or bool(self.list())
        return False

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def list(self) -> list[str]:
        """Names directly under this location (empty if it does not exist)."""
        sel = pafs.FileSelector(self.path, allow_not_found=True)
        try:
            return sorted(i.base_name for i in self.fs.get_file_info(sel))
        except OSError as err:
            raise StorageError(f"storage {self.uri}: {err}") from err

    def read_bytes(self) -> bytes:
        """The file's bytes; FileNotFoundError if it does not exist."""
        if not self.is_remote:
            return self.local.read_bytes()
        if not self.is_file():
            raise FileNotFoundError(self.uri)
        try:
            with self.fs.open_input_stream(self.path) as f:
                return f.read()
        except OSError as err:
            raise StorageError(f"storage {self.uri}: {err}") from err

    def read_text(self) -> str:
        """The file's text; FileNotFoundError if it does not exist."""
        return self.read_bytes().decode("utf-8")

    def check_reachable(self, where: str = "this node") -> None:
        """Fail now, naming the store and the reason, if `where` cannot talk to it."""
        if not self.is_remote:
            return
        bucket = self.path.split("/", 1)[0]
        try:
            info = self.fs.get_file_info(bucket)
        except OSError as err:
            raise StorageError(f"{where} cannot reach the store of {self.uri}: {err}") from err
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"{where}: bucket {bucket!r} of {self.uri} does not exist; create it first")

    # ------------------------------------------------------------------ writing
    def write_bytes(self, data: bytes, *, force: bool = False) -> Location:
        """Write atomically: a local temp file renamed into place (ermgap.io); on an object store one PUT
        (an object appears whole or not at all)."""
        if not self.is_remote:
            atomic_write_bytes(self.local, data, force=force)
            return self
        if not force and self.is_file():
            raise OutputExistsError(f"{self.uri} already exists; pass --force to overwrite it")
        try:
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)
        except OSError as err:
            raise StorageError(f"storage {self.uri}: {err}") from err
        return self

    def write_text(self, text: str, *, force: bool = False) -> Location:
        return self.write_bytes(text.encode("utf-8"), force=force)

    def delete(self) -> None:
        """Remove this file if it exists."""
        if not self.is_remote:
            self.local.unlink(missing_ok=True)
        elif self.is_file():
            self.fs.delete_file(self.path)

    def mkdir(self) -> None:
        if not self.is_remote:
            self.local.mkdir(parents=True, exist_ok=True)

    def claim(self, kind: str, name: str | None = None) -> None:
        """Mark this location as ermgap's output of `kind` (io.claim_dir; on an object store a marker object),
        so a later --force may replace it with another output of that kind."""
        if not self.is_remote:
            claim_dir(self.local, kind, name)
        elif not (self / OWNER_MARKER).is_file():
            (self / OWNER_MARKER).write_text(marker_text(kind, name))

    def check_replaceable(self, kind: str) -> None:
        """For --force, before anything changes: ConfigError unless this location is absent or an output of
        `kind` ermgap wrote (io.check_replaceable)."""
        if not self.is_remote:
            check_replaceable(self.local, kind)
        elif self.exists():
            marker = self / OWNER_MARKER
            refuse_other_kind(self, kind, marker.read_text() if marker.is_file() else None, thing="prefix")

    def set_aside(self, kind: str) -> Path | None:
        """For --force, after every check passed: a directory is moved aside (io.set_aside: kept until the
        new output has started, moved back if it fails before). An object-store prefix cannot be moved,
        so a prefix ermgap wrote (its marker object) is deleted here and None returned. Anything but an
        output of `kind` ermgap wrote is refused either way."""
        if not self.is_remote:
            return set_aside(self.local, kind)
        self.check_replaceable(kind)
        if self.exists():
            self.rmtree()
        return None

    def upload(self, local: str | os.PathLike) -> None:
        """Copy a local file or directory tree to this location."""
        src = Path(local)
        if src.is_dir():
            # File by file: pyarrow's copy_files would also create empty "directory" marker objects.
            for f in sorted(src.rglob("*")):
                if f.is_file():
                    (self / f.relative_to(src).as_posix()).upload(f)
            return
        try:
            with src.open("rb") as f, self.fs.open_output_stream(self.path) as out:
                shutil.copyfileobj(f, out)
        except OSError as err:
            raise StorageError(f"storage {self.uri}: upload of {src} failed: {err}") from err

    def rmtree(self) -> None:
        if not self.is_remote:
            shutil.rmtree(self.local)
            return
        try:
            self.fs.delete_dir(self.path)
        except OSError as err:
            raise StorageError(f"storage {self.uri}: {err}") from err

    @contextlib.contextmanager
    def staged(self) -> Iterator[Path]:
        """A local directory to write this location's files into: the directory itself when local;
        for an object store a temporary directory whose files are uploaded when the block succeeds
        (and nothing is uploaded when it fails)."""
        if not self.is_remote:
            self.mkdir()
            yield self.local
            return
        with tempfile.TemporaryDirectory(prefix="ermgap-stage-") as tmp:
            yield Path(tmp)
            self.upload(tmp)

