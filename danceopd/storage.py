"""job.output_dir on object storage: an `s3://`, `gs://` (or `file://`) URI, through pyarrow.fs.

The job works in a local staging folder (`cfg.output_path`: job.local_dir, or a folder under
the system's temp dir named after the URI) exactly as it does in a local output_dir, and copies
what must outlive the machine to the URI (danceopd.remote_checkpoint says what and when).

Where the store is and who may use it come from the environment, never from the config file:
S3 takes the AWS SDK's variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN,
AWS_PROFILE, AWS_REGION, or an instance/pod role) and AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL for
an S3-speaking server other than AWS (MinIO, Ceph, a test server); GCS takes
GOOGLE_APPLICATION_CREDENTIALS or the machine's service account. `file://` is a local (or
mounted) folder handled with the object-storage rules: a test of them without a server.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import posixpath
import secrets
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

SCHEMES = ("s3", "gs", "file")
ORIGIN = ".origin"  # in a staging copy of a checkpoint: the URI it is a copy of (never uploaded)


def is_uri(text) -> bool:
    return isinstance(text, str) and "://" in text


def check_uri(uri: str) -> str:
    """The URI itself, or a ValueError in one line saying what is wrong with it."""
    scheme, _, rest = uri.partition("://")
    if scheme not in SCHEMES:
        raise ValueError(f"{uri!r}: object storage is one of {', '.join(s + '://' for s in SCHEMES)}, not {scheme}://")
    if scheme == "file" and not rest.startswith("/"):
        raise ValueError(f"{uri!r}: a file:// URI takes an absolute path (file:///abs/path)")
    if scheme != "file" and not rest.split("/", 1)[0]:
        raise ValueError(f"{uri!r}: names no bucket ({scheme}://BUCKET/path)")
    return uri


def staging_dir(uri: str, local_dir: str = "") -> Path:
    """The local folder a job with output_dir `uri` works in."""
    if local_dir:
        p = Path(local_dir).expanduser()
        return p if p.is_absolute() else Path.cwd() / p
    tag = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"danceopd-staging-{tag}"


class Store:
    """A prefix on an object store: whole objects under names relative to it ('a/b.txt')."""

    def __init__(self, uri: str):
        self.uri = check_uri(uri).rstrip("/")
        self.fs, self.root = _filesystem(self.uri)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def child(self, name: str) -> str:
        """The URI of `name` under this store."""
        return f"{self.uri}/{name}"

    def _p(self, name: str) -> str:
        name = name.strip("/")  # '' or '/x' from a prefix that is the store's root
        return posixpath.join(self.root, name) if name else self.root

    def read(self, name: str) -> bytes | None:
        """An object's bytes, or None if there is none."""
        try:
            with self.fs.open_input_stream(self._p(name)) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def write(self, name: str, data: bytes) -> None:
        """One object, whole or not at all (as `upload`)."""
        def put(dest: str) -> None:
            with self.fs.open_output_stream(dest) as f:
                f.write(data)

        self._whole(name, put)

    def upload(self, local: Path, name: str) -> None:
        """The file `local` as object `name`, whole or not at all: an object store makes an
        object visible when its upload completes; a local folder gets a temporary file renamed
        over it."""
        self._whole(name, lambda dest: pafs.copy_files(str(local), dest, source_filesystem=pafs.LocalFileSystem(),
                                                       destination_filesystem=self.fs))

    def _whole(self, name: str, put) -> None:
        path = self._p(name)
        if not self.local:
            put(path)
            return
        self.fs.create_dir(posixpath.dirname(path))
        tmp = f"{path}.{secrets.token_hex(4)}.tmp"
        put(tmp)
        self.fs.move(tmp, path)

    def stat(self, name: str) -> tuple[int, float] | None:
        """(size, modification time in epoch seconds) of an object, or None if there is none."""
        info = self.fs.get_file_info(self._p(name))
        if info.type != pafs.FileType.File:
            return None
        return info.size, info.mtime.timestamp() if info.mtime else 0.0

    def files(self, prefix: str = "") -> dict[str, int]:
        """Every object under `prefix` (names relative to it) and its size."""
        base = self._p(prefix)
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        return {posixpath.relpath(i.path, base): i.size for i in infos if i.type == pafs.FileType.File}

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(self._p(name))

    def delete_prefix(self, prefix: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_dir(self._p(prefix))

    def download(self, name: str, local: Path) -> bool:
        """Copy object `name` to the file `local`; False if there is no such object."""
        if self.stat(name) is None:
            return False
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(self._p(name), str(local), source_filesystem=self.fs,
                        destination_filesystem=pafs.LocalFileSystem())
        return True


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    scheme, _, rest = uri.partition("://")
    if scheme == "s3" and _endpoint():  # explicit: older pyarrow releases do not read the variable
        return pafs.S3FileSystem(endpoint_override=_endpoint()), rest
    return pafs.FileSystem.from_uri(uri)


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def open_store(uri: str) -> Store:
    """The Store of `uri`, one per URI and endpoint in a process (S3 may look up the bucket's
    region when it is made)."""
    return _store(uri.rstrip("/"), _endpoint())


@functools.lru_cache(maxsize=16)
def _store(uri: str, endpoint: str | None) -> Store:
    return Store(uri)


# ---- learner ranks (on any node): their own files, straight to and from the store --------------

def address(folder) -> str:
    """Where a learner rank, maybe on another node, writes or reads a checkpoint's sub-folder:
    the object-storage URI of it when the checkpoint is a staging copy (an ORIGIN file in it or
    in one of its two parents), else the folder itself (a path the rank's node shares)."""
    folder = Path(folder)
    for up in (folder, *list(folder.parents)[:2]):
        if (up / ORIGIN).is_file():
            rel = folder.relative_to(up).as_posix()
            base = (up / ORIGIN).read_text().strip().rstrip("/")
            return base if rel == "." else f"{base}/{rel}"
    return str(folder)


@contextlib.contextmanager
def writing(folder: str):
    """A local folder to write into: `folder` itself, or for a URI a temporary one whose files
    are uploaded under it when the block ends without an error."""
    if not is_uri(folder):
        yield Path(folder)
        return
    store = open_store(folder)
    with tempfile.TemporaryDirectory(prefix="danceopd-upload-") as tmp:
        yield Path(tmp)
        for f in sorted(Path(tmp).rglob("*")):
            if f.is_file():
                store.upload(f, f.relative_to(tmp).as_posix())


@contextlib.contextmanager
def reading(folder: str, names: list[str]):
    """A local folder holding `names` of `folder`: the folder itself, or for a URI a temporary
    one they are downloaded into (one that is not there is left out: the reader names it)."""
    if not is_uri(folder):
        yield Path(folder)
        return
    store = open_store(folder)
    with tempfile.TemporaryDirectory(prefix="danceopd-download-") as tmp:
        for name in names:
            store.download(name, Path(tmp) / name)
        yield Path(tmp)
