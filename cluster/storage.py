"""Artifact store: one interface over S3-compatible object storage and local directories.

    store = open_store("s3://densenas/runs")        # AWS S3, MinIO, Ceph, SeaweedFS
    store = open_store("file:///data/densenas")     # or a plain path
    sha = store.put_json("run1/split/manifest.json", {...})
    store.get_json("run1/split/manifest.json")      # checksum verified on read

Keys are relative POSIX paths under the store's prefix; ``..`` segments, absolute keys and keys
that use the store's reserved internal names are refused with :class:`StorageError`. A "prefix"
argument (``list``, ``delete_prefix``, ``put_tree``, ``get_tree``, ``child``) always means a
directory: ``list("run1")`` lists ``run1/...`` and never ``run10/...``.

Checksums: every write records the sha256 of the bytes -- as S3 object metadata
(``x-amz-meta-sha256``) on S3, as a hidden sidecar file (``.<name>.densenas-sha256``) locally --
and every read with ``verify=True`` recomputes it and raises :class:`ChecksumError` on mismatch.
Objects written by other tools (Ray Train checkpoints through ``pyarrow_fs()``, Parquet written by
pyarrow) carry no recorded checksum and are read unverified.

Atomicity: local writes go to a temporary file in the same directory and are renamed into place,
so a reader never sees half a file. ``publish_json`` additionally uploads to a temporary key and
then copies to the final key on S3 -- a stage writes its manifest with it, last, so a manifest
that exists always describes complete outputs.

S3 configuration comes from the standard AWS chain (``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``,
``AWS_PROFILE`` and ~/.aws/config), or from explicit ``open_store(..., endpoint_url=...,
access_key=..., secret_key=..., region=...)`` options. Connect/read timeouts and a retry cap make
an unreachable endpoint or wrong credentials fail with a clear message in well under 30 s.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Optional
from urllib.parse import urlparse

__all__ = [
    "ArtifactStore",
    "LocalStore",
    "S3Store",
    "S3Options",
    "StorageError",
    "ObjectNotFoundError",
    "ChecksumError",
    "open_store",
    "default_store_uri",
    "ray_storage",
    "sha256_bytes",
    "sha256_file",
    "validate_key",
]

CHECKSUM_META_KEY = "sha256"  # S3 user metadata -> header x-amz-meta-sha256
_RESERVED_MARK = ".densenas-"  # internal files: .<name>.densenas-sha256, .<name>.densenas-tmp-<hex>
_SIDECAR_SUFFIX = ".densenas-sha256"
_CHUNK = 1 << 20

# Defaults chosen so that a dead endpoint (refusing, black-holed, or accepting and never answering)
# fails well within 30 s: attempts are only started while they can finish before the deadline.
DEFAULT_CONNECT_TIMEOUT_S = 4.0
DEFAULT_READ_TIMEOUT_S = 6.0  # per socket read, not per transfer
DEFAULT_MAX_ATTEMPTS = 4
DEFAULT_DEADLINE_S = 25.0  # no new attempt starts unless it would end within this many seconds


class StorageError(RuntimeError):
    """Any artifact-store failure; the message names the object and says what to do."""


class ObjectNotFoundError(StorageError, KeyError):
    """The key does not exist in the store."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class ChecksumError(StorageError):
    """The bytes read back do not match the sha256 recorded when they were written."""


# --------------------------------------------------------------------------------------- helpers


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_internal_name(name: str) -> bool:
    return name.startswith(".") and _RESERVED_MARK in name


def validate_key(key: str, *, allow_empty: bool = False, what: str = "key") -> str:
    """Normalise a relative POSIX key; refuse anything that could escape the store's prefix."""
    if not isinstance(key, str):
        raise StorageError(f"{what} must be a str, got {type(key).__name__}: {key!r}")
    if "\x00" in key or "\\" in key:
        raise StorageError(f"{what} {key!r} contains a NUL or backslash; use '/'-separated relative keys")
    if key.startswith("/") or (len(key) > 1 and key[1] == ":"):
        raise StorageError(
            f"{what} {key!r} is absolute; keys are relative to the store (e.g. 'runs/r1/manifest.json')"
        )
    parts = [p for p in key.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise StorageError(f"{what} {key!r} contains '..' and would escape the store's prefix; refused")
    for part in parts:
        if _is_internal_name(part):
            raise StorageError(
                f"{what} {key!r} uses the reserved internal name pattern '.*{_RESERVED_MARK}*'; rename it"
            )
    norm = "/".join(parts)
    if not norm and not allow_empty:
        raise StorageError(f"{what} is empty; give a relative key such as 'runs/r1/file.bin'")
    return norm


def _dir_prefix(prefix: str) -> str:
    """'' -> '', 'a/b' -> 'a/b/' (prefixes always denote directories)."""
    norm = validate_key(prefix, allow_empty=True, what="prefix")
    return f"{norm}/" if norm else ""


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def default_store_uri(local_dir: str | os.PathLike | None = None) -> str:
    """``$DENSENAS_STORE`` when set (e.g. by ``source .local-stack/env.sh``), else a local directory.

    The local fallback makes a bare checkout work with nothing configured.
    """
    env = os.environ.get("DENSENAS_STORE", "").strip()
    if env:
        return env
    base = Path(local_dir) if local_dir is not None else Path.cwd() / ".densenas-store"
    return str(base.resolve())


# -------------------------------------------------------------------------------------- interface


class ArtifactStore:
    """Common behaviour; subclasses implement the ``_raw_*`` primitives for one backend."""

    scheme: str = ""

    # ---- primitives (backend specific)
    def _raw_put(self, key: str, data: bytes, sha: str) -> None:
        raise NotImplementedError

    def _raw_put_file(self, key: str, path: Path, sha: str) -> None:
        raise NotImplementedError

    def _raw_get(self, key: str) -> tuple[bytes, Optional[str]]:
        raise NotImplementedError

    def _raw_get_file(self, key: str, dest: Path) -> Optional[str]:
        """Stream to ``dest``; return the recorded checksum (or None)."""
        raise NotImplementedError

    def _raw_exists(self, key: str) -> bool:
        raise NotImplementedError

    def _raw_list(self, dir_prefix: str) -> list[str]:
        raise NotImplementedError

    def _raw_delete(self, keys: list[str]) -> None:
        raise NotImplementedError

    def _raw_publish(self, key: str, data: bytes, sha: str) -> None:
        raise NotImplementedError

    def _raw_put_if_absent(self, key: str, data: bytes, sha: str) -> bool:
        raise NotImplementedError

    def child(self, prefix: str) -> "ArtifactStore":
        raise NotImplementedError

    def uri_for(self, key: str = "") -> str:
        raise NotImplementedError

    def pyarrow_fs(self):  # -> tuple[pyarrow.fs.FileSystem, str]
        raise NotImplementedError

    def check(self) -> None:
        """Fail fast (StorageError) when the store cannot be used; cheap, no writes."""

    # ---- public API
    @property
    def uri(self) -> str:
        return self.uri_for("")

    def put_bytes(self, key: str, data: bytes) -> str:
        key = validate_key(key)
        data = bytes(data)
        sha = sha256_bytes(data)
        self._raw_put(key, data, sha)
        return sha

    def get_bytes(self, key: str, verify: bool = True) -> bytes:
        key = validate_key(key)
        data, recorded = self._raw_get(key)
        if verify and recorded:
            actual = sha256_bytes(data)
            if actual != recorded:
                raise ChecksumError(
                    f"checksum mismatch for {self.uri_for(key)}: recorded sha256 {recorded}, read "
                    f"{actual} ({len(data)} bytes). The object is corrupt or was overwritten outside "
                    f"the store; re-run the stage that wrote it (delete it first)."
                )
        return data

    def put_file(self, key: str, path: str | os.PathLike) -> str:
        key = validate_key(key)
        path = Path(path)
        if not path.is_file():
            raise StorageError(f"put_file: local file {path} does not exist (or is not a regular file)")
        sha = sha256_file(path)
        self._raw_put_file(key, path, sha)
        return sha

    def get_file(self, key: str, path: str | os.PathLike, verify: bool = True) -> Path:
        key = validate_key(key)
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.densenas-tmp-{uuid.uuid4().hex[:12]}"
        try:
            recorded = self._raw_get_file(key, tmp)
            if verify and recorded:
                actual = sha256_file(tmp)
                if actual != recorded:
                    raise ChecksumError(
                        f"checksum mismatch for {self.uri_for(key)}: recorded sha256 {recorded}, read "
                        f"{actual}. The object is corrupt; re-run the stage that wrote it."
                    )
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                tmp.unlink()
        return dest

    def put_json(self, key: str, obj: Any) -> str:
        return self.put_bytes(key, _json_bytes(obj))

    def get_json(self, key: str, verify: bool = True) -> Any:
        data = self.get_bytes(key, verify=verify)
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StorageError(f"{self.uri_for(key)} is not valid UTF-8 JSON: {exc}") from exc

    def publish_json(self, key: str, obj: Any) -> str:
        """Atomically publish a JSON document (a stage's manifest): temp key first, then final key."""
        key = validate_key(key)
        data = _json_bytes(obj)
        sha = sha256_bytes(data)
        self._raw_publish(key, data, sha)
        return sha

    def put_json_if_absent(self, key: str, obj: Any) -> bool:
        """Create ``key`` only if no object has that key (a conditional put); True if this call created it.

        The building block of a lease: of two writers racing for the same key, one gets True."""
        key = validate_key(key)
        data = _json_bytes(obj)
        return self._raw_put_if_absent(key, data, sha256_bytes(data))

    def put_tree(self, prefix: str, local_dir: str | os.PathLike) -> dict[str, str]:
        """Upload every file under ``local_dir`` to ``prefix/<relative path>``; returns {rel: sha256}."""
        root = Path(local_dir)
        if not root.is_dir():
            raise StorageError(f"put_tree: local directory {root} does not exist")
        base = _dir_prefix(prefix)
        checksums: dict[str, str] = {}
        for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
            rel = path.relative_to(root).as_posix()
            if any(_is_internal_name(part) for part in rel.split("/")):
                continue
            checksums[rel] = self.put_file(base + rel, path)
        return checksums

    def get_tree(self, prefix: str, local_dir: str | os.PathLike, verify: bool = True) -> list[Path]:
        """Download every key under ``prefix`` into ``local_dir`` (paths relative to the prefix)."""
        base = _dir_prefix(prefix)
        root = Path(local_dir)
        root.mkdir(parents=True, exist_ok=True)
        written = []
        for key in self.list(prefix):
            rel = key[len(base):]
            written.append(self.get_file(key, root / rel, verify=verify))
        return written

    def exists(self, key: str) -> bool:
        return self._raw_exists(validate_key(key))

    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys (relative to this store) under the directory ``prefix``."""
        base = _dir_prefix(prefix)
        return sorted(k for k in self._raw_list(base) if not any(_is_internal_name(p) for p in k.split("/")))

    def delete(self, key: str) -> None:
        """Delete one object; deleting a missing key is not an error."""
        self._raw_delete([validate_key(key)])

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under the directory ``prefix`` (never the whole store unless prefix='')."""
        keys = self._raw_list(_dir_prefix(prefix))
        if keys:
            self._raw_delete(keys)
        return len(keys)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


def _json_bytes(obj: Any) -> bytes:
    try:
        return (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise StorageError(f"object is not JSON-serialisable: {exc}") from exc


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy scalars / arrays
        return value.tolist()
    if hasattr(value, "model_dump"):  # pydantic
        return value.model_dump(mode="json")
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# ---------------------------------------------------------------------------------- local backend


class LocalStore(ArtifactStore):
    """A directory tree; checksums in hidden sidecar files next to each object."""

    scheme = "file"

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()

    def _path(self, key: str) -> Path:
        path = (self.root / key) if key else self.root
        # keys are validated already; resolve() also guards against symlinks pointing outside
        resolved = path.resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise StorageError(f"key {key!r} resolves outside the store root {self.root}; refused")
        return path

    @staticmethod
    def _sidecar(path: Path) -> Path:
        return path.parent / f".{path.name}{_SIDECAR_SUFFIX}"

    @staticmethod
    def _atomic_write(path: Path, writer: Callable[[io.BufferedWriter], None]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.densenas-tmp-{uuid.uuid4().hex[:12]}"
        try:
            with open(tmp, "wb") as handle:
                writer(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()

    def _write(self, key: str, writer: Callable[[io.BufferedWriter], None], sha: str) -> None:
        path = self._path(key)
        if path.is_dir():
            raise StorageError(f"cannot write {self.uri_for(key)}: a directory of that name exists")
        try:
            # checksum first: a crash in between flags the old bytes as corrupt rather than
            # letting new bytes pass unverified
            self._atomic_write(self._sidecar(path), lambda h: h.write(sha.encode() + b"\n"))
            self._atomic_write(path, writer)
        except OSError as exc:
            raise StorageError(f"cannot write {path}: {exc} (check permissions and free disk space)") from exc

    def _raw_put(self, key, data, sha):
        self._write(key, lambda h: h.write(data), sha)

    def _raw_put_file(self, key, path, sha):
        def copy(handle):
            with open(path, "rb") as src:
                shutil.copyfileobj(src, handle, _CHUNK)

        self._write(key, copy, sha)

    def _raw_publish(self, key, data, sha):
        self._raw_put(key, data, sha)  # temp file + rename is already atomic locally

    def _raw_put_if_absent(self, key, data, sha):
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.densenas-tmp-{uuid.uuid4().hex[:12]}"
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(tmp, path)     # atomic, and fails when the name exists: the conditional put
            except FileExistsError:
                return False
            self._atomic_write(self._sidecar(path), lambda h: h.write(sha.encode() + b"\n"))
            return True
        except OSError as exc:
            raise StorageError(f"cannot write {path}: {exc} (check permissions and free disk space)") from exc
        finally:
            if tmp.exists():
                tmp.unlink()

    def _recorded(self, path: Path) -> Optional[str]:
        sidecar = self._sidecar(path)
        try:
            return sidecar.read_text().strip() or None
        except FileNotFoundError:
            return None

    def _missing(self, key: str) -> ObjectNotFoundError:
        return ObjectNotFoundError(f"no object {self.uri_for(key)} (key {key!r} not in {self.root})")

    def _raw_get(self, key):
        path = self._path(key)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise self._missing(key) from None
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc}") from exc
        return data, self._recorded(path)

    def _raw_get_file(self, key, dest):
        path = self._path(key)
        if not path.is_file():
            raise self._missing(key)
        shutil.copyfile(path, dest)
        return self._recorded(path)

    def _raw_exists(self, key):
        return self._path(key).is_file()

    def _raw_list(self, dir_prefix):
        start = self._path(dir_prefix.rstrip("/"))
        if not start.is_dir():
            return []
        keys = []
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [d for d in dirnames if not _is_internal_name(d)]
            for name in filenames:
                if _is_internal_name(name):
                    continue
                keys.append((Path(dirpath) / name).relative_to(self.root).as_posix())
        return keys

    def _raw_delete(self, keys):
        for key in keys:
            path = self._path(key)
            for target in (path, self._sidecar(path)):
                try:
                    target.unlink()
                except FileNotFoundError:
                    pass
                except IsADirectoryError:
                    raise StorageError(f"{self.uri_for(key)} is a directory; use delete_prefix") from None
            self._prune_empty_dirs(path.parent)

    def _prune_empty_dirs(self, directory: Path) -> None:
        while directory != self.root and self.root in directory.parents:
            try:
                directory.rmdir()
            except OSError:
                return
            directory = directory.parent

    def child(self, prefix):
        return LocalStore(self.root / _dir_prefix(prefix))

    def uri_for(self, key=""):
        key = validate_key(key, allow_empty=True)
        return (self.root / key).as_uri() if key else self.root.as_uri()

    def pyarrow_fs(self):
        import pyarrow.fs as pafs

        self.root.mkdir(parents=True, exist_ok=True)
        return pafs.LocalFileSystem(), str(self.root)

    def check(self):
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create store directory {self.root}: {exc}") from exc
        if not os.access(self.root, os.W_OK):
            raise StorageError(f"store directory {self.root} is not writable")


# ------------------------------------------------------------------------------------- S3 backend


class S3Options:
    """Connection settings; unset fields come from the standard AWS environment / config chain."""

    def __init__(
        self,
        endpoint_url: Optional[str] = None,
        access_key: Optional[str] = None,
        secret_key: Optional[str] = None,
        session_token: Optional[str] = None,
        region: Optional[str] = None,
        profile: Optional[str] = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        read_timeout: float = DEFAULT_READ_TIMEOUT_S,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        deadline: float = DEFAULT_DEADLINE_S,
    ):
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
        self.access_key = access_key
        self.secret_key = secret_key
        self.session_token = session_token
        self.region = region
        self.profile = profile
        self.connect_timeout = float(os.environ.get("DENSENAS_S3_CONNECT_TIMEOUT", connect_timeout))
        self.read_timeout = float(os.environ.get("DENSENAS_S3_READ_TIMEOUT", read_timeout))
        self.max_attempts = int(os.environ.get("DENSENAS_S3_MAX_ATTEMPTS", max_attempts))
        self.deadline = float(os.environ.get("DENSENAS_S3_DEADLINE", deadline))

    def __repr__(self) -> str:  # never print secrets
        return f"S3Options(endpoint_url={self.endpoint_url!r}, region={self.region!r}, access_key={'set' if self.access_key else 'from env'})"


class S3Store(ArtifactStore):
    """``s3://bucket/prefix`` through boto3 (and pyarrow.fs.S3FileSystem for ``pyarrow_fs()``)."""

    scheme = "s3"

    def __init__(self, bucket: str, prefix: str = "", options: Optional[S3Options] = None):
        if not bucket:
            raise StorageError("S3 URI has no bucket; use s3://<bucket>/<prefix>")
        self.bucket = bucket
        self.prefix = validate_key(prefix, allow_empty=True, what="prefix")
        self.options = options or S3Options()
        self._client = None
        self._session = None

    # Ray ships stores to workers by pickling: drop the (unpicklable) client, rebuild lazily.
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_client"] = None
        state["_session"] = None
        return state

    def _boto_session(self):
        if self._session is None:
            import boto3

            self._session = boto3.session.Session(
                aws_access_key_id=self.options.access_key,
                aws_secret_access_key=self.options.secret_key,
                aws_session_token=self.options.session_token,
                region_name=self.options.region,
                profile_name=self.options.profile,
            )
        return self._session

    @property
    def client(self):
        if self._client is None:
            from botocore.config import Config

            opts = self.options
            config = Config(
                connect_timeout=opts.connect_timeout,
                read_timeout=opts.read_timeout,
                retries={"max_attempts": 1, "mode": "standard"},  # retries are ours (_call): bounded time
                signature_version="s3v4",
                # non-AWS servers (SeaweedFS, MinIO, Ceph) want path-style URLs and plain checksums
                s3={"addressing_style": "path" if opts.endpoint_url else "auto"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
            session = self._boto_session()
            self._client = session.client(
                "s3",
                endpoint_url=opts.endpoint_url,
                region_name=session.region_name or "us-east-1",
                config=config,
            )
        return self._client

    def _key(self, key: str) -> str:
        return _join(self.prefix, key)

    def _rel(self, full_key: str) -> str:
        return full_key[len(self.prefix) + 1:] if self.prefix else full_key

    # -- retries and error translation: every boto error becomes a StorageError that says what to do
    def _call(self, what: str, key: str, fn: Callable[[], Any], object_op: bool = True) -> Any:
        """Run ``fn`` (re-invocable) with retries on transient errors, within a total deadline.

        botocore's own retries are off (max_attempts=1) so the bound is ours: a new attempt starts
        only if even a worst-case attempt (connect + 2 reads: Expect-100 then response) still ends
        before ``options.deadline`` seconds. ``object_op`` says whether a 404 means "no such key"
        (else: no such bucket).
        """
        import botocore.exceptions as bex

        opts = self.options
        worst_attempt = opts.connect_timeout + 2 * opts.read_timeout
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 -- classified right below
                transient = isinstance(exc, (bex.EndpointConnectionError, bex.ConnectTimeoutError,
                                             bex.ReadTimeoutError, bex.ConnectionClosedError,
                                             bex.IncompleteReadError, bex.ResponseStreamingError))
                if isinstance(exc, bex.ClientError):
                    code = str(exc.response.get("Error", {}).get("Code", ""))
                    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
                    transient = status >= 500 or code in ("SlowDown", "RequestTimeout", "Throttling",
                                                          "ThrottlingException", "InternalError",
                                                          "ServiceUnavailable")
                backoff = min(0.5 * 2 ** (attempt - 1), 4.0)
                elapsed = time.monotonic() - started
                if (transient and attempt < opts.max_attempts
                        and elapsed + backoff + worst_attempt <= opts.deadline):
                    time.sleep(backoff)
                    continue
                raise self._translate(exc, what, key, object_op, attempt, elapsed) from None

    def _translate(self, exc: Exception, what: str, key: str, object_op: bool, attempts: int,
                   elapsed: float) -> Exception:
        import botocore.exceptions as bex

        where = self.uri_for(key) if key else f"s3://{self.bucket}/{self.prefix}"
        endpoint = self.options.endpoint_url or "AWS S3 (no AWS_ENDPOINT_URL set)"
        tried = f"after {attempts} attempt(s) in {elapsed:.1f} s"
        if isinstance(exc, StorageError):
            return exc
        if isinstance(exc, bex.NoCredentialsError):
            return StorageError(
                f"{what} {where}: no AWS credentials found. Set AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY (for the embedded stack: `source .local-stack/env.sh`)."
            )
        if isinstance(exc, (bex.EndpointConnectionError, bex.ConnectTimeoutError, bex.ReadTimeoutError,
                            bex.ConnectionClosedError)):
            return StorageError(
                f"{what} {where}: cannot reach the S3 endpoint {endpoint} {tried} ({type(exc).__name__}: "
                f"{exc}). Is the server running? For the embedded one run `python -m cluster.local up` "
                f"and `source .local-stack/env.sh`; otherwise check AWS_ENDPOINT_URL."
            )
        if isinstance(exc, bex.ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchKey", "404", "NotFound") and object_op:
                return ObjectNotFoundError(f"no object {where}")
            if code in ("NoSuchBucket", "404", "NotFound"):
                return StorageError(
                    f"{what} {where}: bucket {self.bucket!r} does not exist at {endpoint}. Create it "
                    f"(the embedded stack creates 'densenas'; elsewhere `aws s3 mb s3://{self.bucket}`)."
                )
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403",
                        "InvalidToken", "ExpiredToken", "AuthorizationHeaderMalformed") or status == 403:
                return StorageError(
                    f"{what} {where}: the S3 endpoint {endpoint} refused the credentials ({code or status}). "
                    f"Check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (the embedded stack writes them "
                    f"to .local-stack/env.sh) and that the key may access bucket {self.bucket!r}."
                )
            return StorageError(f"{what} {where} failed at {endpoint} {tried}: {code or status}: "
                                f"{error.get('Message', exc)}")
        if isinstance(exc, bex.BotoCoreError):
            return StorageError(f"{what} {where} failed at {endpoint} {tried}: {type(exc).__name__}: {exc}")
        if isinstance(exc, OSError):
            return StorageError(f"{what} {where}: local I/O error: {exc}")
        return exc

    # -- primitives
    def _raw_put(self, key, data, sha):
        self._call("put", key, lambda: self.client.put_object(
            Bucket=self.bucket, Key=self._key(key), Body=data, Metadata={CHECKSUM_META_KEY: sha}))

    def _raw_put_file(self, key, path, sha):
        from boto3.s3.transfer import TransferConfig

        # multipart for big files; each part retried by botocore; the object appears only when complete
        transfer = TransferConfig(multipart_threshold=64 * _CHUNK, multipart_chunksize=16 * _CHUNK, max_concurrency=4)
        self._call("put_file", key, lambda: self.client.upload_file(
            str(path), self.bucket, self._key(key),
            ExtraArgs={"Metadata": {CHECKSUM_META_KEY: sha}}, Config=transfer))

    def _raw_publish(self, key, data, sha):
        full = self._key(key)
        directory, name = posixpath.split(full)
        tmp = _join(directory, f".{name}.densenas-tmp-{uuid.uuid4().hex[:12]}")
        self._call("publish (temp upload)", key, lambda: self.client.put_object(
            Bucket=self.bucket, Key=tmp, Body=data, Metadata={CHECKSUM_META_KEY: sha}))
        try:
            self._call("publish (copy to final key)", key, lambda: self.client.copy_object(
                Bucket=self.bucket, Key=full, CopySource={"Bucket": self.bucket, "Key": tmp},
                MetadataDirective="REPLACE", Metadata={CHECKSUM_META_KEY: sha},
                ContentType="application/json"))
        finally:
            try:
                self.client.delete_object(Bucket=self.bucket, Key=tmp)
            except Exception:  # a stray temp key is hidden from list() and harmless
                pass

    def _raw_put_if_absent(self, key, data, sha):
        import botocore.exceptions as bex

        def put():
            # HEAD first: a server that ignores If-None-Match still refuses an existing key (only two
            # writers racing within one request's time could both win there)
            if self._raw_exists(key):
                return False
            try:
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data,
                                       Metadata={CHECKSUM_META_KEY: sha}, IfNoneMatch="*")
                return True
            except bex.ClientError as exc:   # 412: the key exists; 409: a concurrent conditional put won
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                    return False
                raise

        return self._call("conditional put", key, put)

    def _raw_get(self, key):
        def fetch():
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return response["Body"].read(), (response.get("Metadata") or {}).get(CHECKSUM_META_KEY)

        return self._call("get", key, fetch)

    def _raw_get_file(self, key, dest):
        def stream():
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            with open(dest, "wb") as handle:  # a retry starts the file over
                for chunk in response["Body"].iter_chunks(_CHUNK):
                    handle.write(chunk)
            return (response.get("Metadata") or {}).get(CHECKSUM_META_KEY)

        return self._call("get_file", key, stream)

    def _raw_exists(self, key):
        try:
            self._call("exists", key, lambda: self.client.head_object(Bucket=self.bucket, Key=self._key(key)))
            return True
        except ObjectNotFoundError:
            return False

    def _raw_list(self, dir_prefix):
        full = _join(self.prefix, dir_prefix)
        full = f"{full}/" if full else ""

        def collect():
            keys = []
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                keys.extend(obj["Key"] for obj in page.get("Contents", []))
            return keys

        return [self._rel(k) for k in self._call("list", dir_prefix, collect, object_op=False) if not k.endswith("/")]

    def _raw_delete(self, keys):
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": self._key(k)} for k in keys[start:start + 1000]]
            response = self._call("delete", keys[start] if len(batch) == 1 else "", lambda: self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}), object_op=False)
            errors = response.get("Errors") or []
            if errors:
                first = errors[0]
                raise StorageError(f"delete failed for {len(errors)} keys, e.g. {first.get('Key')}: {first.get('Code')} {first.get('Message')}")

    def child(self, prefix):
        return S3Store(self.bucket, _join(self.prefix, _dir_prefix(prefix)), self.options)

    def uri_for(self, key=""):
        key = validate_key(key, allow_empty=True)
        path = _join(self.prefix, key)
        return f"s3://{self.bucket}/{path}" if path else f"s3://{self.bucket}"

    def check(self):
        self._call("check bucket", "", lambda: self.client.head_bucket(Bucket=self.bucket), object_op=False)

    def credentials(self) -> tuple[Optional[str], Optional[str], Optional[str], str]:
        """(access_key, secret_key, session_token, region) as resolved by the AWS chain."""
        session = self._boto_session()
        creds = session.get_credentials()
        frozen = creds.get_frozen_credentials() if creds else None
        region = session.region_name or "us-east-1"
        if frozen is None:
            return None, None, None, region
        return frozen.access_key, frozen.secret_key, frozen.token, region

    def pyarrow_fs(self):
        import pyarrow.fs as pafs

        access, secret, token, region = self.credentials()
        kwargs: dict[str, Any] = dict(
            region=region,
            connect_timeout=self.options.connect_timeout,
            request_timeout=self.options.read_timeout,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=self.options.max_attempts),
        )
        if access and secret:
            kwargs.update(access_key=access, secret_key=secret)
            if token:
                kwargs["session_token"] = token
        if self.options.endpoint_url:
            parsed = urlparse(self.options.endpoint_url)
            kwargs["endpoint_override"] = parsed.netloc or parsed.path
            kwargs["scheme"] = parsed.scheme or "https"
            kwargs["force_virtual_addressing"] = False
        return pafs.S3FileSystem(**kwargs), _join(self.bucket, self.prefix)


# ----------------------------------------------------------------------------------------- entry


def open_store(uri: str | os.PathLike, **s3_options: Any) -> ArtifactStore:
    """``s3://bucket/prefix`` -> S3Store; ``file:///path`` or a plain path -> LocalStore.

    ``s3_options`` (endpoint_url, access_key, secret_key, session_token, region, profile,
    connect_timeout, read_timeout, max_attempts) override the AWS environment for S3 URIs.
    """
    text = os.fspath(uri)
    if not text:
        raise StorageError("empty store URI; use s3://bucket/prefix, file:///path or a directory path")
    parsed = urlparse(text)
    if parsed.scheme == "s3":
        return S3Store(parsed.netloc, parsed.path.lstrip("/"), S3Options(**s3_options))
    if s3_options:
        raise StorageError(f"S3 options {sorted(s3_options)} given for non-S3 store URI {text!r}")
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(f"file URI {text!r} names host {parsed.netloc!r}; use file:///absolute/path")
        return LocalStore(parsed.path)
    if parsed.scheme and len(parsed.scheme) > 1:  # (a one-letter scheme is a Windows drive)
        raise StorageError(f"unsupported store URI scheme {parsed.scheme!r} in {text!r}; use s3://, file:// or a path")
    return LocalStore(text)


def ray_storage(store: ArtifactStore) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for ``ray.train.RunConfig`` backed by ``store``.

    S3 stores give a bucket/prefix path without scheme plus a configured S3FileSystem (so the
    endpoint override and credentials travel with it); local stores give the absolute directory
    and ``None`` (Ray's default local filesystem).
    """
    if isinstance(store, LocalStore):
        store.root.mkdir(parents=True, exist_ok=True)
        return str(store.root), None
    fs, base = store.pyarrow_fs()
    return base, fs
