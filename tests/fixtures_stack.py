"""Session fixtures: the real embedded stack (SeaweedFS, MLflow server) on random free ports.

Use with ``from tests.fixtures_stack import *`` (or from tests/conftest.py). Everything runs on
loopback from a temporary state directory and is stopped by PID at the end of the session; no
moto, no mocks. Services start lazily: a test that needs only S3 never waits for MLflow.

- ``local_stack``  -- the (not yet started) LocalStack for this session
- ``stack_s3``     -- LocalStack with SeaweedFS up and the ``densenas`` bucket created
- ``stack_mlflow`` -- the same, plus the MLflow server (artifacts in s3://densenas/mlflow-artifacts)
- ``s3_store``     -- an S3Store on a fresh prefix of the bucket, credentials passed explicitly
- ``TcpProxy``     -- a real TCP forwarder that can be cut and restored, to simulate an outage
"""
from __future__ import annotations

import socket
import threading
import uuid
from pathlib import Path

import pytest

from cluster.local import LocalStack, StackPorts
from cluster.storage import open_store

__all__ = ["local_stack", "stack_s3", "stack_mlflow", "s3_store", "TcpProxy", "store_for"]


# Several test modules do `from tests.fixtures_stack import *`, which registers a separate
# session fixture per module: share one stack between them so a session starts each server once.
_SHARED: dict[str, LocalStack] = {}


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory):
    if "stack" not in _SHARED:
        _SHARED["stack"] = LocalStack(tmp_path_factory.mktemp("local-stack"), StackPorts.free())
    stack = _SHARED["stack"]
    try:
        yield stack
    finally:
        stack.down()  # by PID: SIGTERM, SIGKILL after the grace period; a second call is a no-op


@pytest.fixture(scope="session")
def stack_s3(local_stack):
    local_stack.up(("s3",))
    return local_stack


@pytest.fixture(scope="session")
def stack_mlflow(stack_s3):
    stack_s3.up(("mlflow",))
    return stack_s3


def store_for(stack: LocalStack, prefix: str):
    """An S3 store on the stack with explicit options (the process environment stays untouched)."""
    creds = stack.credentials()
    return open_store(f"s3://{stack.bucket}/{prefix}", endpoint_url=stack.s3_endpoint,
                      access_key=creds["access_key"], secret_key=creds["secret_key"], region="us-east-1")


@pytest.fixture
def s3_store(stack_s3):
    return store_for(stack_s3, f"tests/{uuid.uuid4().hex[:10]}")


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target port; ``cut()`` drops and refuses connections (an
    outage as a client sees it), ``restore()`` brings the path back on the same port."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = None
        self._running = False
        self.restore()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        if self._running:
            return
        if self._listener is None:
            self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(64)
        self._running = True
        self._thread = threading.Thread(target=self._accept_loop, args=(self._listener,), daemon=True)
        self._thread.start()

    def cut(self) -> None:
        self._running = False
        listener, self._listener = self._listener, None
        with self._lock:
            conns, self._conns = self._conns, []
        for sock in conns + [listener]:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    close = cut

    def _accept_loop(self, listener: socket.socket) -> None:
        while self._running:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
