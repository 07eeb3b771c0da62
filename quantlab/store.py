"""The one module that touches fsspec: store roots, atomic writes, listings, bulk transfers.

A store is a root URI: a local folder (the default), file://, memory:// (tests) or
s3://bucket/prefix. Everything else in quantlab passes `str` paths relative to that root and
bytes; backend exceptions are translated here into our own errors.

    store = Store("s3://bucket/lab")                     # endpoint/credentials: see below
    store.write_bytes("runs/r1/manifest.json", data)     # atomic: readers never see half a file
    store.read_bytes("runs/r1/manifest.json")

S3 endpoint and credentials come from the standard AWS environment (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ...), from the non-secret
`storage_options` of a config, and from QUANTLAB_STORAGE_OPTIONS (JSON; what
`--storage-option key=value` sets, so that secrets reach torchrun workers through the
environment, never through a config, a manifest or a command line).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pathlib
import posixpath
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar

import fsspec
from fsspec.callbacks import Callback
from fsspec.core import url_to_fs

from quantlab.errors import IntegrityError, NotFoundError, StoreError

log = logging.getLogger(__name__)
ENV_OPTIONS = "QUANTLAB_STORAGE_OPTIONS"
T = TypeVar("T")

# Transient failures worth retrying: connection refused/reset while an endpoint restarts,
# throttling and 5xx answers. Anything else (missing bucket, denied, bad key) fails at once.
_TRANSIENT_MARKERS = ("connect", "timeout", "timed out", "slowdown", "slow down", "throttl",
                      "reduce your request rate", "service unavailable", "internal error", "503",
                      "500", "reset by peer", "server disconnected", "broken pipe")
_TRANSIENT_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout",
                    "Throttling", "ThrottlingException", "RequestLimitExceeded", "500", "503"}
# s3fs turns 503 SlowDown into OSError(EBUSY), 500 InternalError into OSError(EREMOTEIO).
_TRANSIENT_ERRNOS = {errno.EBUSY, getattr(errno, "EREMOTEIO", errno.EIO), errno.ETIMEDOUT,
                     errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE}
_RETRY_DELAYS = (0.5, 1, 2, 4, 8)  # seconds; about 15 s in all, enough for an endpoint restart
# Before a run starts, an endpoint that does not answer is more likely a wrong URL than a
# restart: the preflight probe gives up after about 3.5 s.
PREFLIGHT_RETRY_DELAYS = (0.5, 1, 2)
# S3 error codes that mean the credentials themselves were refused (not the permission).
_REJECTED_CREDENTIALS = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
                         "ExpiredToken", "InvalidClientTokenId", "TokenRefreshRequired")


def env_storage_options() -> dict[str, Any]:
    """Storage options from QUANTLAB_STORAGE_OPTIONS (a JSON object), or {}."""
    raw = os.environ.get(ENV_OPTIONS)
    if not raw:
        return {}
    try:
        opts = json.loads(raw)
    except json.JSONDecodeError:
        raise StoreError(f"{ENV_OPTIONS} must be a JSON object of storage options") from None
    if not isinstance(opts, dict):
        raise StoreError(f"{ENV_OPTIONS} must be a JSON object of storage options")
    return opts


def resolve_options(uri: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Merge explicit storage options with the environment's, for the URI's protocol."""
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    if protocol not in ("s3", "s3a", "gs", "gcs", "az", "abfs"):
        return {}
    merged = {**(options or {}), **env_storage_options()}
    if protocol in ("s3", "s3a"):
        # s3fs names the endpoint inside client_kwargs; accept the flat spelling users expect.
        if "endpoint_url" in merged:
            merged["client_kwargs"] = {**merged.get("client_kwargs", {}),
                                       "endpoint_url": merged.pop("endpoint_url")}
        # Other processes write the store, so a cached listing is soon stale; and s3fs would
        # keep every entry of a dataset's listing (a million dicts for ImageNet) for good.
        merged.setdefault("use_listings_cache", False)
        # One retry layer with a known budget (call_with_retries): botocore's own retries
        # (5 attempts, each retrying connection errors) nested inside ours took a minute to
        # report an endpoint where nothing listens. s3fs still retries SlowDown briefly.
        merged["config_kwargs"] = {"retries": {"total_max_attempts": 1, "mode": "standard"},
                                   **merged.get("config_kwargs", {})}
    return merged


def filesystem(uri: str, options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a URI or local path."""
    uri = normalize_uri(uri)
    try:
        return url_to_fs(uri, **resolve_options(uri, options))
    except (ImportError, ValueError) as e:
        raise StoreError(f"cannot open {uri!r}: {e}") from None


def normalize_uri(uri: str) -> str:
    """Local paths become absolute; file:// is dropped; remote URIs lose a trailing slash."""
    if not uri:
        raise StoreError("empty store or data URI; give a local path, file://, memory:// or s3://")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" not in uri:
        return os.path.abspath(os.path.expanduser(uri))
    return uri.rstrip("/")


def is_local(uri: str) -> bool:
    return "://" not in normalize_uri(uri)


@dataclass(frozen=True, slots=True)  # slots: a listing of a million files stays small
class FileInfo:
    """One stored file: its path relative to a listed prefix, size and content tag."""

    relpath: str
    size: int
    etag: str  # S3 ETag, or size+mtime for local files, or "" where the backend has none


class Store:
    """A root URI and the handful of operations quantlab needs on it."""

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None,
                 retry_delays: tuple[float, ...] = _RETRY_DELAYS):
        self.root = normalize_uri(root)
        self.storage_options = dict(storage_options or {})
        self.fs, self._base = filesystem(self.root, self.storage_options)
        self.local = is_local(self.root)
        self.retry_delays = retry_delays

    def __repr__(self) -> str:
        return f"Store({self.root!r})"

    # -- paths -------------------------------------------------------------------------
    def path(self, rel: str) -> str:
        """Backend path of a relative path (validated: no '..', not absolute)."""
        return posixpath.join(self._base, check_relpath(rel)) if rel else self._base

    def uri(self, rel: str = "") -> str:
        """Full URI of a relative path, for people to read and other tools to open."""
        return posixpath.join(self.root, rel) if rel else self.root

    def url(self, rel: str = "") -> str:
        """A link to a relative path: file:///... for a local store, the URI otherwise."""
        return pathlib.Path(self.uri(rel)).as_uri() if self.local else self.uri(rel)

    # -- reads -------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self._call(f"check {self.uri(rel)}", lambda: self.fs.exists(self.path(rel)))

    def read_bytes(self, rel: str) -> bytes:
        return self._call(f"read {self.uri(rel)}", lambda: self.fs.cat_file(self.path(rel)))

    def read_json(self, rel: str) -> Any:
        data = self.read_bytes(rel)
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise IntegrityError(f"{self.uri(rel)} is not valid JSON") from None

    @contextmanager
    def open(self, rel: str) -> Iterator[BinaryIO]:
        """A binary reader (streams large objects instead of holding them in memory)."""
        f = self._call(f"open {self.uri(rel)}", lambda: self.fs.open(self.path(rel), "rb"))
        with f:
            yield f

    def list_dir(self, rel: str) -> list[str]:
        """Names directly below a folder ([] if it does not exist)."""
        base = self.path(rel)

        def ls() -> list[str]:
            try:
                entries = self.fs.ls(base, detail=False, refresh=True)
            except FileNotFoundError as e:
                if "bucket" in str(e).lower():  # a missing bucket is an error, not an empty store
                    raise
                return []
            return sorted(posixpath.basename(e.rstrip("/")) for e in entries)
        return self._call(f"list {self.uri(rel)}", ls)

    def find(self, rel: str = "") -> list[FileInfo]:
        """Every file below a prefix, in one recursive listing (paginated, not per folder)."""
        return list_files(self.uri(rel), self.storage_options)

    def arrow_filesystem(self):
        """This store as a pyarrow filesystem (for pyarrow.dataset over the metric tables)."""
        import pyarrow.fs as pafs
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))

    # -- writes ------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a whole object atomically: readers see the old content or the new, never half.

        S3 and memory:// PUTs are atomic. Local files go to a unique temp name in the same
        folder, then os.replace() commits them.
        """
        target = self.path(rel)
        if self.local:
            def write_local() -> None:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                # Hidden temp name: globs (*.parquet) and dataset discovery never pick it up.
                tmp = os.path.join(os.path.dirname(target),
                                   f".{os.path.basename(target)}.tmp-{uuid.uuid4().hex[:8]}")
                try:
                    with open(tmp, "wb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, target)
                finally:
                    if os.path.exists(tmp):
                        os.remove(tmp)
            self._call(f"write {self.uri(rel)}", write_local)
        else:
            self._call(f"write {self.uri(rel)}", lambda: self.fs.pipe_file(target, data))

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def write_many(self, files: dict[str, bytes]) -> None:
        """Write many small objects concurrently (s3fs runs the PUTs in parallel)."""
        if self.local:
            for rel, data in files.items():
                self.write_bytes(rel, data)
            return
        paths = {self.path(rel): data for rel, data in files.items()}
        self._call(f"write {len(files)} files under {self.root}", lambda: self.fs.pipe(paths))

    def delete(self, rel: str, recursive: bool = False) -> None:
        def rm() -> None:
            try:
                self.fs.rm(self.path(rel), recursive=recursive)
            except FileNotFoundError:
                pass
        self._call(f"delete {self.uri(rel)}", rm)

    def check_writable(self) -> None:
        """Probe the store: reachable, bucket present, writable, credentials accepted.

        Leaves nothing behind: a probe object is written and deleted at the root (S3 and
        other object stores); a local folder that does not exist yet is not created, its
        nearest existing parent must be writable.
        """
        probe = f".quantlab-probe-{uuid.uuid4().hex[:12]}"
        if self.local and not os.path.isdir(self.root):
            parent = self.root
            while not os.path.exists(parent):
                parent = os.path.dirname(parent)
            if not (os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK)):
                raise StoreError(f"cannot create store {self.root}: {parent} is not a writable "
                                 "folder")
            return
        self.write_bytes(probe, b"ok")
        self.delete(probe)

    # -- error translation and retries -------------------------------------------------
    def _call(self, what: str, fn: Callable[[], T]) -> T:
        return call_with_retries(what, fn, self.retry_delays)


def call_with_retries(what: str, fn: Callable[[], T],
                      delays: tuple[float, ...] = _RETRY_DELAYS) -> T:
    """Run a storage call; retry transient faults with backoff; translate the rest.

    Transient faults (connection refused or reset, timeouts, throttling, 5xx) are retried
    after each of `delays` seconds, then raise StoreError(transient=True). A missing object
    or bucket raises NotFoundError, refused credentials or a denied request StoreError, at
    once. Messages never include credentials: only the operation, the URI and error codes.
    """
    for attempt, delay in enumerate((*delays, None)):
        try:
            return fn()
        except (NotFoundError, StoreError):
            raise
        except FileNotFoundError as e:
            missing = "bucket" if "bucket" in str(e).lower() else "object"
            raise NotFoundError(f"cannot {what}: no such {missing}") from None
        except PermissionError as e:
            code = _error_code(e)
            if code in _REJECTED_CREDENTIALS:
                raise StoreError(f"cannot {what}: the credentials were rejected ({code}); check "
                                 "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE") from None
            raise StoreError(f"cannot {what}: permission denied ({code or 'AccessDenied'}); the "
                             "credentials were accepted but may not do this: check the bucket "
                             "or IAM policy") from None
        except Exception as e:  # botocore/aiohttp/OS errors: classify by message
            text = f"{type(e).__name__}: {e}".lower()
            if any(m in text for m in ("credential", "invalidaccesskeyid", "signaturedoesnotmatch",
                                       "accessdenied", "forbidden", "403")):
                raise StoreError(f"cannot {what}: credentials were missing or rejected "
                                 f"({type(e).__name__})") from None
            transient = (_error_code(e) in _TRANSIENT_CODES or isinstance(e, TimeoutError)
                         or getattr(e, "errno", None) in _TRANSIENT_ERRNOS
                         or any(m in text for m in _TRANSIENT_MARKERS))
            if delay is None or not transient:
                if transient:
                    raise StoreError(f"cannot {what}: the store is unreachable or overloaded "
                                     f"({_error_code(e) or type(e).__name__}) after "
                                     f"{attempt + 1} attempts in {sum(delays):.1f} s",
                                     transient=True) from None
                raise StoreError(f"cannot {what}: {type(e).__name__}: {_first_line(e)}") from None
            log.warning("storage error on %s (%s); retry %d in %.1fs", what, type(e).__name__,
                        attempt + 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _error_code(e: BaseException) -> str | None:
    """The S3 error code behind an s3fs-translated exception (its cause is botocore's)."""
    response = getattr(e.__cause__, "response", None) or {}
    return response.get("Error", {}).get("Code")


def check_relpath(rel: str) -> str:
    """A relative POSIX path without '..' or a leading '/' (no escaping the root)."""
    norm = posixpath.normpath(rel)
    if rel.startswith("/") or norm == ".." or norm.startswith("../") or "\\" in rel:
        raise StoreError(f"path {rel!r} escapes the store root")
    return norm


def read_uri(uri: str, options: dict[str, Any] | None = None) -> bytes:
    """Bytes of one object given by a full URI or local path (e.g. a float checkpoint)."""
    fs, path = filesystem(uri, options)
    return call_with_retries(f"read {uri}", lambda: fs.cat_file(path))


def content_hash(uri: str, options: dict[str, Any] | None = None) -> str:
    """A tag that changes whenever an object's bytes change (e.g. a float checkpoint's).

    The ETag (with the size) where the backend keeps one, such as S3, so nothing is
    downloaded; otherwise the sha256 of the bytes, read in chunks.
    """
    fs, path = filesystem(uri, options)
    info = call_with_retries(f"check {uri}", lambda: fs.info(path))
    etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
    if etag and not is_local(uri):
        return f"etag:{etag}:{info.get('size')}"
    return "sha256:" + sha256_of(uri, options)


def sha256_of(uri: str, options: dict[str, Any] | None = None,
              delays: tuple[float, ...] = _RETRY_DELAYS) -> str:
    """The sha256 of an object's bytes, streamed in 1 MiB chunks."""
    fs, path = filesystem(uri, options)

    def sha256() -> str:
        digest = hashlib.sha256()
        with fs.open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()
    return call_with_retries(f"read {uri}", sha256, delays)


def list_files(uri: str, options: dict[str, Any] | None = None) -> list[FileInfo]:
    """Every file below a URI with size and content tag, from one recursive listing."""
    fs, base = filesystem(uri, options)

    def find() -> dict[str, dict]:
        return fs.find(base, detail=True)
    entries = call_with_retries(f"list {uri}", find)
    out = []
    for path, info in entries.items():
        if info.get("type", "file") != "file":
            continue
        rel = posixpath.relpath(path, base) if path != base else posixpath.basename(path)
        etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
        if not etag and "mtime" in info:
            etag = f"{info['size']}-{float(info['mtime']):.6f}"
        out.append(FileInfo(rel, int(info.get("size") or 0), etag))
    return sorted(out, key=lambda f: f.relpath)


def download(uri: str, files: list[FileInfo], local_dir: str,
             options: dict[str, Any] | None = None, batch_size: int = 128,
             chunk_size: int = 8192, on_progress: Callable[[int], None] | None = None,
             progress_every: float = 5.0) -> None:
    """Copy files below `uri` into `local_dir` concurrently; a retry resumes, not restarts.

    On S3 each chunk of `chunk_size` files is one `fs.get(list, list)`: s3fs runs `batch_size`
    GETs at a time over its async client (within its connection pool), with no listing or
    HEAD per file (the caller listed once). Chunks bound the memory that a million pending
    transfers would take, for one brief drain of the pool per chunk. A transient failure
    retries only the chunk's files not yet present with their listed size.
    `on_progress(n)` reports n more files done, at most every `progress_every` seconds.
    """
    fs, base = filesystem(uri, options)
    kwargs = {"batch_size": batch_size} if fs.async_impl else {}
    progress = _Progress(len(files), on_progress, progress_every)
    for i in range(0, len(files), chunk_size):
        pending = [(posixpath.join(base, f.relpath), os.path.join(local_dir, *f.relpath.split("/")), f)
                   for f in files[i:i + chunk_size]]
        for d in {os.path.dirname(lp) for _, lp, _ in pending}:
            os.makedirs(d, exist_ok=True)
        attempts = 0

        def get() -> None:
            nonlocal pending, attempts
            if attempts:  # a retry: keep what the failed attempt got
                pending = [p for p in pending if not has_copy(p[1], p[2])]
            attempts += 1
            fs.get([r for r, _, _ in pending], [lp for _, lp, _ in pending], callback=progress,
                   **kwargs)
        call_with_retries(f"download {len(pending)} files from {uri}", get)
    progress.flush()


def has_copy(path: str, f: FileInfo) -> bool:
    """Is `path` a local file of the listed size (a complete download of `f`)?"""
    try:
        return os.path.getsize(path) == f.size
    except OSError:
        return False


class _Progress(Callback):
    """fsspec callback -> on_progress(files done since the last report), throttled.

    fsspec counts a transfer when it ends, also when it failed; a retry counts it again, so
    the running total can pass the number of files (callers clamp it).
    """

    def __init__(self, total: int, on_progress: Callable[[int], None] | None, every: float):
        super().__init__(size=total)
        self.on_progress, self.every = on_progress, every
        self.reported, self.last = 0, time.monotonic()

    def set_size(self, size: int) -> None:
        pass  # fs.get sets each chunk's size; the total of all chunks is what we report against

    def call(self, *args, **kwargs) -> None:
        if time.monotonic() - self.last >= self.every:
            self.flush()

    def flush(self) -> None:
        if self.on_progress is not None and self.value > self.reported:
            self.on_progress(self.value - self.reported)
        self.reported, self.last = self.value, time.monotonic()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""
