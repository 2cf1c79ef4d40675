"""A local-directory stand-in for ``cluster.storage.ArtifactStore``, used only while cluster/storage.py
has not landed (``pipeline.runtime.open_store`` prefers the real one). Same method names as the
contract in docs/architecture.md; plain paths and ``file://`` URIs only.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any


class LocalStoreError(ValueError):
    pass


class LocalDirStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        k = PurePosixPath(key)
        if k.is_absolute() or ".." in k.parts:
            raise LocalStoreError(f"key {key!r} must be a relative path without '..'")
        return self.root / k

    def put_bytes(self, key: str, data: bytes) -> None:
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, p)

    def get_bytes(self, key: str) -> bytes:
        p = self._path(key)
        if not p.is_file():
            raise FileNotFoundError(f"{self.uri_for(key)} does not exist")
        return p.read_bytes()

    def put_json(self, key: str, obj: Any) -> None:
        self.put_bytes(key, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())

    publish_json = put_json  # put_bytes already renames into place

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))

    def put_file(self, key: str, path: str | Path) -> None:
        self.put_bytes(key, Path(path).read_bytes())

    def get_file(self, key: str, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(self.get_bytes(key))

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix) if prefix else self.root
        start = base if base.is_dir() else base.parent
        if not start.exists():
            return []
        out = []
        for p in start.rglob("*"):
            if p.is_file() and not p.name.startswith("."):
                rel = p.relative_to(self.root).as_posix()
                if rel.startswith(prefix):
                    out.append(rel)
        return sorted(out)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        p = self._path(prefix)
        if p.is_dir():
            shutil.rmtree(p)
        else:
            for k in self.list(prefix):
                self.delete(k)

    def child(self, prefix: str) -> "LocalDirStore":
        return LocalDirStore(self._path(prefix))

    def uri_for(self, key: str) -> str:
        return (self.root / key).as_uri() if key else self.uri

    def pyarrow_fs(self):
        import pyarrow.fs as pafs

        return pafs.LocalFileSystem(), str(self.root)
