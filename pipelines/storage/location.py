"""Where a sweep's files live: a local (or NFS) directory, or an object-store URI, through pyarrow's filesystem
layer as Ray Tune does.

``run.storage_path`` is either a directory (``results``, ``/shared/ltsweep``) or a URI that
``pyarrow.fs.FileSystem.from_uri`` understands, e.g. ``s3://bucket/prefix``. An S3-compatible store (MinIO, Ceph,
moto) is named the way pyarrow and Ray take it: in the URI's query
(``s3://bucket/prefix?endpoint_override=127.0.0.1:9000&scheme=http``) or with the ``AWS_ENDPOINT_URL`` environment
variable (credentials: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, or ``access_key=`` / ``secret_key=`` in
the query). A *location* below it is written the same way: the query stays at the end
(``join("s3://b/p?scheme=http", "pretrain")`` is ``s3://b/p/pretrain?scheme=http``), so one string names a file
anywhere on the cluster and every node resolves it alone. Local locations stay :class:`pathlib.Path` objects, so
everything local works exactly as before.

The helpers: :func:`resolve` (location -> (pyarrow filesystem, path)), :func:`tune_storage` (what Tune's
``RunConfig(storage_path=..., storage_filesystem=...)`` takes), :func:`join`, :func:`is_file`, :func:`exists`,
:func:`read_text` / :func:`write_text` (small files, whole or not at all), :func:`upload_dir` /
:func:`download_dir` (``pyarrow.fs.copy_files``), :func:`node_local_dir` and :func:`local_copy` (a node-local cache
of a location), and :func:`lock`.

**The lock on object storage.** An object store has no file locks and pyarrow has no conditional put, so
:func:`lock` uses markers with owner tokens and a stale timeout, needing only what S3 guarantees (strong
read-after-write consistency of PUT, DELETE and LIST, since December 2020; MinIO and moto alike): a contender PUTs
its own marker ``<location>.lock/<token>``, then LISTs the folder. It holds the lock when its marker is the only
one there; otherwise it deletes its marker, waits a random moment and tries again. Two contenders cannot both hold
it: if A's LIST showed only A's marker, B PUT its marker after that LIST, so B's LIST (later still) shows A's marker,
which stays until A releases the lock. The holder rewrites its marker every ``heartbeat_s`` seconds; a marker whose
modification time does not change for ``stale_s`` seconds (as the waiter's own clock measures it, so clock skew
does not matter) belongs to a crashed holder and is deleted. The cost: two contenders arriving together may both
back off once. (A named detached Ray actor would only serialise drivers of one Ray cluster, and a conditional PUT
is neither in pyarrow nor in every S3-compatible store.) On local storage the lock is a plain ``filelock`` file
``<location>.lock``, as before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lt_models.errors import ConfigError

log = logging.getLogger(__name__)

Location = Path | str  # a local directory/file (Path) or a URI (str)

CACHE_ENV = "LTSWEEP_CACHE_DIR"  # the node-local cache of object-storage files (default <tmp>/ltsweep-cache)
LOCK_STALE_S = 120.0  # a lock marker unchanged this long belongs to a crashed holder
LOCK_HEARTBEAT_S = 15.0  # how often the holder rewrites its marker (well below LOCK_STALE_S)


def is_uri(location: Any) -> bool:
    """A URI (``scheme://...``) rather than a local path."""
    return "://" in str(location)


def as_location(value: Any) -> Location:
    """A config or command-line value as a location: URIs stay strings (Path would fold ``s3://`` into ``s3:/``),
    anything else becomes a Path."""
    if isinstance(value, Path):
        return value
    if not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"expected a directory or a URI such as s3://bucket/prefix, got {value!r}")
    return str(value) if is_uri(value) else Path(value)


def _split(uri: str) -> tuple[str, str]:
    base, _, query = uri.partition("?")
    return base.rstrip("/"), query


def display(location: Location) -> str:
    """The location without its query (no endpoint or credentials in messages)."""
    return _split(str(location))[0] if is_uri(location) else str(location)


def join(location: Location, *parts: str) -> Location:
    """``location / part / ...``: a Path for a local location, a URI (its query kept at the end) for a URI."""
    if not is_uri(location):
        return Path(location, *parts)
    base, query = _split(str(location))
    joined = "/".join([base, *(p.strip("/") for p in parts)])
    return f"{joined}?{query}" if query else joined


def parent(location: Location) -> Location:
    if not is_uri(location):
        return Path(location).parent
    base, query = _split(str(location))
    up = base.rsplit("/", 1)[0]
    return f"{up}?{query}" if query else up


def name(location: Location) -> str:
    return _split(str(location))[0].rsplit("/", 1)[-1] if is_uri(location) else Path(location).name


_FILESYSTEMS: dict[str, tuple[Any, str]] = {}


def resolve(location: Location) -> tuple[Any, str]:
    """(pyarrow filesystem, path on it) of a location. A URI goes through ``pyarrow.fs.FileSystem.from_uri`` (so
    its query and ``AWS_ENDPOINT_URL`` name the endpoint); a local path is made absolute."""
    from pyarrow import fs as pafs

    if not is_uri(location):
        return pafs.LocalFileSystem(), os.path.abspath(Path(location).expanduser())
    base, query = _split(str(location))
    scheme, rest = base.split("://", 1)
    if scheme == "file":
        return pafs.FileSystem.from_uri(str(location))
    bucket, _, key = rest.partition("/")
    fs_key = f"{scheme}://{bucket}" + (f"?{query}" if query else "")  # one filesystem per bucket and endpoint
    if fs_key not in _FILESYSTEMS:
        try:
            _FILESYSTEMS[fs_key] = pafs.FileSystem.from_uri(fs_key)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"run.storage_path: cannot open {display(location)}: {exc}; give a directory or a "
                "URI pyarrow understands, e.g. s3://bucket/prefix?endpoint_override=HOST:PORT"
                "&scheme=http"
            ) from None
    fs, bucket_path = _FILESYSTEMS[fs_key]
    return fs, bucket_path.rstrip("/") + (f"/{key}" if key else "")


def tune_storage(storage_path: Location) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Tune's RunConfig / Tuner.restore: the local path and None, or the
    bucket path and the resolved filesystem (prefix-stripped, as Tune expects when given a filesystem)."""
    if not is_uri(storage_path):
        return os.path.abspath(Path(storage_path).expanduser()), None  # as Tune had it before (no symlinks resolved)
    fs, path = resolve(storage_path)
    return path, fs


def check_storage(storage_path: Location) -> None:
    """Fail early, in one line naming ``run.storage_path``, when an object store or its bucket is unreachable."""
    if not is_uri(storage_path):
        Path(storage_path).mkdir(parents=True, exist_ok=True)
        return
    from pyarrow import fs as pafs

    fs, path = resolve(storage_path)
    bucket = path.split("/", 1)[0]
    try:
        info = fs.get_file_info(bucket)
    except OSError as exc:
        raise ConfigError(
            f"run.storage_path {display(storage_path)}: the object store does not answer ({exc}); "
            "check the endpoint (?endpoint_override=HOST:PORT&scheme=http or AWS_ENDPOINT_URL) and the "
            "credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
        ) from None
    if info.type != pafs.FileType.Directory:
        raise ConfigError(
            f"run.storage_path {display(storage_path)}: bucket {bucket!r} does not exist; create it "
            f"first (e.g. `aws s3 mb s3://{bucket}`) or fix the URI"
        )


def is_file(location: Location) -> bool:
    from pyarrow import fs as pafs

    fs, path = resolve(location)
    return fs.get_file_info(path).type == pafs.FileType.File


def exists(location: Location) -> bool:
    from pyarrow import fs as pafs

    fs, path = resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(location: Location) -> bytes:
    fs, path = resolve(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(location: Location) -> str:
    return read_bytes(location).decode("utf-8")


def read_json(location: Location) -> Any:
    return json.loads(read_text(location))


def write_text(location: Location, text: str) -> None:
    """Write a small file whole or not at all: temp file + rename locally (lt_models.atomic); one PUT on an object
    store (objects never appear half-written)."""
    if not is_uri(location):
        from lt_models.atomic import write_bytes_atomic

        write_bytes_atomic(location, text.encode("utf-8"))
        return
    fs, path = resolve(location)
    with fs.open_output_stream(path) as f:
        f.write(text.encode("utf-8"))


def write_json(location: Location, obj: Any, **dump_kwargs: Any) -> None:
    write_text(location, json.dumps(obj, **dump_kwargs))


def delete_file(location: Location) -> None:
    """Remove a file if it is there."""
    from pyarrow import fs as pafs

    fs, path = resolve(location)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def delete_dir(location: Location) -> None:
    """Remove a directory tree (every object under a prefix) if it is there."""
    from pyarrow import fs as pafs

    fs, path = resolve(location)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def list_files(location: Location) -> list[str]:
    """Every file below a directory, as sorted paths relative to it ([] if it is absent)."""
    from pyarrow import fs as pafs

    fs, path = resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(i.path[len(path) :].lstrip("/") for i in infos if i.type == pafs.FileType.File)


def open_input(location: Location, relative: str = ""):
    """A readable stream of a file (``relative`` below ``location``)."""
    fs, path = resolve(location)
    return fs.open_input_stream(f"{path}/{relative}" if relative else path)


def upload_dir(local_dir: os.PathLike, location: Location) -> None:
    """Copy a local directory tree to a location (``pyarrow.fs.copy_files``)."""
    from pyarrow import fs as pafs

    fs, path = resolve(location)
    pafs.copy_files(
        str(Path(local_dir).resolve()), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
    )


def download_dir(location: Location, local_dir: os.PathLike) -> None:
    """Copy a directory tree at a location into a local directory (``pyarrow.fs.copy_files``)."""
    from pyarrow import fs as pafs

    fs, path = resolve(location)
    Path(local_dir).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(
        path, str(Path(local_dir).resolve()), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
    )


# ---- node-local copies -------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """This node's cache of object-storage files: ``$LTSWEEP_CACHE_DIR``, else ``<tmp>/ltsweep-cache``."""
    return Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir(), "ltsweep-cache"))


def node_local_dir(location: Location) -> Path:
    """A node-local directory for a location: the directory itself when it is local (or NFS), else this node's
    cache directory of that URI (``cache_root()/<sha256 of the URI without its query>[:16]``; created)."""
    if not is_uri(location):
        return Path(location)
    out = cache_root() / hashlib.sha256(display(location).encode()).hexdigest()[:16]
    out.mkdir(parents=True, exist_ok=True)
    return out


def local_copy(location: Location, verify: Callable[[Path], str | None] | None = None) -> Path:
    """A directory on this node with the contents of ``location``: the directory itself when local, else a copy in
    :func:`node_local_dir` downloaded once per node (under a file lock, into a temp dir renamed into place, so
    concurrent trials on one node download it once and never see half of it). ``verify(dir)`` returns None when a
    copy is good, else a line saying what is wrong: a bad existing copy is downloaded again, a bad fresh one raises.
    Only for immutable (content-addressed) directories: a copy is never refreshed once it verified."""
    if not is_uri(location):
        return Path(location)
    from filelock import FileLock

    from lt_models.atomic import atomic_dir, remove_dir

    dest = node_local_dir(location)
    with FileLock(str(dest) + ".lock"):
        if dest.is_dir() and any(dest.iterdir()):
            problem = verify(dest) if verify else None
            if problem is None:
                return dest
            log.warning("%s; downloading %s again", problem, display(location))
            remove_dir(dest)
        with atomic_dir(dest) as tmp:
            download_dir(location, tmp)
            problem = verify(tmp) if verify else None
            if problem is not None:
                raise RuntimeError(f"downloaded {display(location)}: {problem}")
    return dest


# ---- the lock ----------------------------------------------------------------------------------------------------


@contextmanager
def lock(
    location: Location,
    timeout: float = -1,
    *,
    stale_s: float = LOCK_STALE_S,
    heartbeat_s: float = LOCK_HEARTBEAT_S,
    poll_s: float = 1.0,
) -> Iterator[None]:
    """Hold the lock named ``<location>.lock`` (see the module docstring): a ``filelock`` file on local storage, owner
    markers on an object store. ``timeout`` < 0 waits forever; else :class:`TimeoutError` after that many seconds."""
    if not is_uri(location):
        from filelock import FileLock

        Path(location).parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{location}.lock", timeout=timeout):
            yield
        return
    base, query = _split(str(location))
    marker = _ObjectLock(f"{base}.lock" + (f"?{query}" if query else ""), stale_s, heartbeat_s)
    marker.acquire(timeout, poll_s)
    try:
        yield
    finally:
        marker.release()


class _ObjectLock:
    """Owner markers in a folder of an object store (the protocol of the module docstring)."""

    def __init__(self, folder: str, stale_s: float, heartbeat_s: float):
        self.fs, self.dir = resolve(folder)
        self.token = f"{time.time_ns()}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.path = f"{self.dir}/{self.token}"
        self.stale_s, self.heartbeat_s = stale_s, heartbeat_s
        self._seen: dict[tuple[str, Any], float] = {}  # (marker, its mtime) -> when this process first saw it
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _put(self) -> None:
        with self.fs.open_output_stream(self.path) as f:
            f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}).encode())

    def _markers(self) -> list[Any]:
        from pyarrow import fs as pafs

        return [
            i
            for i in self.fs.get_file_info(pafs.FileSelector(self.dir, allow_not_found=True))
            if i.type == pafs.FileType.File
        ]

    def acquire(self, timeout: float, poll_s: float) -> None:
        start = time.monotonic()
        while True:
            self._put()
            others = [i for i in self._markers() if i.path.rstrip("/") != self.path]
            if not others:
                self._beat = threading.Thread(target=self._heartbeat, daemon=True, name="ltsweep-lock-heartbeat")
                self._beat.start()
                return
            self.fs.delete_file(self.path)  # back off: whoever is alone with its marker holds the lock
            self._break_stale(others)
            if 0 <= timeout < time.monotonic() - start:
                raise TimeoutError(
                    f"the lock {self.dir} is held by {[i.base_name for i in others]} (waited {timeout:.0f}s)"
                )
            time.sleep(poll_s * random.uniform(0.5, 1.5))  # random: two contenders do not retry in lockstep

    def _break_stale(self, others: list[Any]) -> None:
        now = time.monotonic()
        for info in others:
            first = self._seen.setdefault((info.path, info.mtime), now)
            if now - first > self.stale_s:
                log.warning(
                    "lock marker %s did not change for %.0fs: its holder is gone; removing it", info.path, now - first
                )
                try:
                    self.fs.delete_file(info.path)
                except FileNotFoundError:
                    pass

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._put()
            except OSError as exc:  # the store hiccuped: the next beat tries again, well before stale_s
                log.warning("lock heartbeat %s failed: %s", self.path, exc)

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            pass
