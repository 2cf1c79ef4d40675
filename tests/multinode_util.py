"""A real two-node Ray cluster on one machine, for multi-node tests (tests/test_multinode.py).

    with two_node_cluster() as cluster:          # head "node_a" + second node "node_b"
        with connect(cluster):                    # ray.init(address=...) with the cluster's token
            ...                                   # tasks with resources={"node_b": 1} land on node b
        cluster.stop_node_b()                     # SIGTERM to node b's process group, by PID

Each node is a separate ``ray start --block`` process (its own session, so its whole process
tree -- gcs_server, raylet, workers, agents -- shares one process group that we can signal by
PID). Nothing here calls ``ray stop``: that kills *every* Ray process on the machine, including
other people's clusters on a shared host.

Why the flags:
- Ports: every port Ray would otherwise take at a fixed default (6379, 8265, 10001, 52365, ...)
  is chosen free here, so several clusters can run side by side on one host.
- ``--temp-dir``: Ray 2.60 accepts it per node ("Can be specified per node"), so each node gets
  its own directory under one private root: no clash with a default /tmp/ray session, and the
  ``ray start --address`` of node b cannot pick up someone else's bootstrap address. The root is
  short because Ray puts Unix sockets under it (107-byte path limit).
- Token auth: Ray 2.60 turns token authentication on whenever a token exists (~/.ray/auth_token).
  We decide instead of inheriting: ``RAY_AUTH_MODE=token`` and a fresh ``RAY_AUTH_TOKEN`` (env
  var, highest precedence, never written to ~/.ray) for both nodes and every driver. So the
  tests exercise the same auth path as a real cluster and never touch the user's token file.
- ``--node-ip-address 127.0.0.1`` and ``--dashboard-host 127.0.0.1``: nodes register with the
  loopback address. (Some Ray helpers, such as the client server, still bind the host's own
  address; Ray 2.60 offers no flag for that.)
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
_STARTED_MARKER = "Ray runtime started"


class MultiNodeError(RuntimeError):
    """A local Ray node did not start, join, or stop in time; the message has its log tail."""


def ray_cli() -> str:
    """The ``ray`` executable of this interpreter's environment (not whatever is on PATH)."""
    candidate = Path(sys.executable).with_name("ray")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("ray")
    if not found:
        raise MultiNodeError("no `ray` executable next to the Python interpreter or on PATH; "
                             "install ray[default] into this environment")
    return found


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on loopback right now (bound together, then released)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def make_auth_env(token: str | None = None) -> dict[str, str]:
    """Environment for nodes and drivers: token auth on, with the given (or a fresh) token."""
    from ray._private.authentication.authentication_token_generator import (
        generate_new_authentication_token,
    )

    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token or generate_new_authentication_token()}


@dataclass
class RayNodeProcess:
    """One ``ray start --block`` process; its process group holds the node's whole tree."""

    name: str
    popen: subprocess.Popen
    temp_dir: Path
    log_path: Path
    resources: dict[str, float]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "<no log>"


def _node_env(auth_env: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(auth_env)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # A node started from a pytest process must not inherit a driver's address.
    env.pop("RAY_ADDRESS", None)
    return env


def _spawn_node(name: str, args: list[str], temp_dir: Path, log_dir: Path,
                auth_env: dict[str, str], resources: dict[str, float],
                timeout_s: float) -> RayNodeProcess:
    temp_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    cmd = [ray_cli(), "start", "--block", "--disable-usage-stats",
           "--node-ip-address", LOOPBACK, "--temp-dir", str(temp_dir),
           "--resources", json.dumps(resources), *args]
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=_node_env(auth_env),
                                 start_new_session=True)  # own process group: stop by PID
    node = RayNodeProcess(name, popen, temp_dir, log_path, resources)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not node.alive():
            raise MultiNodeError(f"`ray start` for {name} exited with code {popen.returncode}:\n"
                                 f"{node.log_tail()}")
        if _STARTED_MARKER in node.log_tail(100_000):
            return node
        time.sleep(0.25)
    stop_node(node)
    raise MultiNodeError(f"{name} did not start within {timeout_s:.0f} s:\n{node.log_tail()}")


def start_head(temp_root: Path, auth_env: dict[str, str], *, num_cpus: int = 1,
               resources: dict[str, float] | None = None, include_dashboard: bool = False,
               timeout_s: float = START_TIMEOUT_S) -> tuple[RayNodeProcess, str, str | None]:
    """Start the head node; returns (node, GCS address "127.0.0.1:P", dashboard URL or None)."""
    (gcs, node_manager, object_manager, client, agent_grpc, agent_http, metrics,
     runtime_env, dashboard) = free_ports(9)
    args = ["--head", "--port", str(gcs), "--num-cpus", str(num_cpus), "--num-gpus", "0",
            "--node-manager-port", str(node_manager), "--object-manager-port", str(object_manager),
            "--ray-client-server-port", str(client),
            "--dashboard-agent-grpc-port", str(agent_grpc),
            "--dashboard-agent-listen-port", str(agent_http),
            "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(runtime_env)]
    # Ray 2.60 starts a dashboard process even with --include-dashboard false, on port 8265
    # unless told otherwise: always give it a free port and keep it on loopback.
    args += ["--include-dashboard", "true" if include_dashboard else "false",
             "--dashboard-host", LOOPBACK, "--dashboard-port", str(dashboard)]
    node = _spawn_node("node_a", args, temp_root / "a", temp_root, auth_env,
                       resources if resources is not None else {"node_a": 1}, timeout_s)
    url = f"http://{LOOPBACK}:{dashboard}" if include_dashboard else None
    return node, f"{LOOPBACK}:{gcs}", url


def start_worker_node(address: str, temp_root: Path, auth_env: dict[str, str], *,
                      name: str = "node_b", num_cpus: int = 1,
                      resources: dict[str, float] | None = None,
                      timeout_s: float = START_TIMEOUT_S) -> RayNodeProcess:
    """Start a second node joining the head at ``address`` (same host, its own temp dir)."""
    node_manager, object_manager, agent_grpc, agent_http, metrics, runtime_env = free_ports(6)
    args = ["--address", address, "--num-cpus", str(num_cpus), "--num-gpus", "0",
            "--node-manager-port", str(node_manager), "--object-manager-port", str(object_manager),
            "--dashboard-agent-grpc-port", str(agent_grpc),
            "--dashboard-agent-listen-port", str(agent_http),
            "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(runtime_env)]
    return _spawn_node(name, args, temp_root / name[-1], temp_root, auth_env,
                       resources if resources is not None else {name: 1}, timeout_s)


# What a `ray start` launched with start_new_session spawned, and how to stop such a tree: the
# local stack's helpers (one implementation for both).
from cluster.local import _pids_mentioning, _session_pids, stop_process_tree  # noqa: E402


def stop_node(node: RayNodeProcess, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Stop one node by its PID (``cluster.local.stop_process_tree``): SIGTERM to the ``ray start
    --block`` leader, which shuts its children down in order (about 2 s); then SIGTERM, and finally
    SIGKILL, to whatever of its session -- or anything naming its private temp dir -- is left."""
    sid = node.pid  # start_new_session=True: session id == process group id == leader's PID

    def remaining() -> list[int]:
        node.popen.poll()  # reap the leader so it does not linger as a zombie
        return sorted(set(_session_pids(sid)) | set(_pids_mentioning(str(node.temp_dir))))

    stop_process_tree(node.pid, remaining, timeout_s)
    with contextlib.suppress(subprocess.TimeoutExpired):
        node.popen.wait(timeout=5)


@dataclass
class LocalCluster:
    """A head (node_a) and a second node (node_b) running as separate processes."""

    head: RayNodeProcess
    node_b: RayNodeProcess | None
    address: str                     # GCS address for ray.init(address=...) / ray start
    dashboard_url: str | None        # for `ray job submit --address URL`, when started with one
    auth_env: dict[str, str]         # RAY_AUTH_MODE / RAY_AUTH_TOKEN for drivers and the CLI
    temp_root: Path
    stopped: list[str] = field(default_factory=list)

    def driver_env(self) -> dict[str, str]:
        """os.environ plus what a driver subprocess (or `ray job` CLI) needs to reach the cluster."""
        env = _node_env(self.auth_env)
        env["RAY_ADDRESS"] = self.dashboard_url or self.address
        return env

    def stop_node_b(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        if self.node_b is not None and "node_b" not in self.stopped:
            stop_node(self.node_b, timeout_s)
            self.stopped.append("node_b")

    def stop(self) -> None:
        """Stop node b, then the head; remove the private temp root. Safe to call twice."""
        self.stop_node_b()
        if "node_a" not in self.stopped:
            stop_node(self.head)
            self.stopped.append("node_a")
        shutil.rmtree(self.temp_root, ignore_errors=True)


def start_two_node_cluster(*, cpus_per_node: int = 1, head_cpus: int | None = None,
                           node_b_cpus: int | None = None, include_dashboard: bool = False,
                           timeout_s: float = START_TIMEOUT_S) -> LocalCluster:
    """Head with resource ``node_a``, second node with ``node_b``; both joined and alive.
    ``head_cpus`` / ``node_b_cpus`` override ``cpus_per_node`` (logical CPUs: may exceed the cores)."""
    temp_root = Path(tempfile.mkdtemp(prefix="rmn", dir="/tmp"))
    auth_env = make_auth_env()
    head = node_b = None
    try:
        head, address, url = start_head(temp_root, auth_env, num_cpus=head_cpus or cpus_per_node,
                                        include_dashboard=include_dashboard, timeout_s=timeout_s)
        node_b = start_worker_node(address, temp_root, auth_env, num_cpus=node_b_cpus or cpus_per_node,
                                   timeout_s=timeout_s)
    except BaseException:
        for node in (node_b, head):
            if node is not None:
                stop_node(node)
        shutil.rmtree(temp_root, ignore_errors=True)
        raise
    return LocalCluster(head, node_b, address, url, auth_env, temp_root)


@contextlib.contextmanager
def two_node_cluster(**kwargs) -> Iterator[LocalCluster]:
    """Context manager around start_two_node_cluster that always stops both nodes."""
    cluster = start_two_node_cluster(**kwargs)
    try:
        yield cluster
    finally:
        cluster.stop()


@contextlib.contextmanager
def connect(cluster: LocalCluster, timeout_s: float = 30.0, **init_kwargs):
    """``ray.init(address=cluster.address)`` in this process with the cluster's token, restoring
    the environment and calling ``ray.shutdown()`` afterwards.

    Caveat (seen in the full suite): Ray's core keeps the token it first used, so a later local
    ``ray.init()`` in the same process fails with InvalidAuthToken. In tests, drive the cluster from
    a subprocess (see tests/test_cluster_configs.py::test_two_node_local_cluster_smoke)."""
    import ray

    saved = {k: os.environ.get(k) for k in (*cluster.auth_env, "RAY_ADDRESS")}
    os.environ.update(cluster.auth_env)
    os.environ.pop("RAY_ADDRESS", None)
    try:
        # The C++ side caches the auth config; refresh it so it sees the env we just set.
        from ray._raylet import Config

        Config.initialize("")
        ray.init(address=cluster.address, log_to_driver=False, **init_kwargs)
        wait_for_alive_nodes(2 - len(cluster.stopped), timeout_s)
        yield ray
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        with contextlib.suppress(Exception):
            from ray._raylet import Config

            Config.initialize("")


def wait_for_alive_nodes(count: int, timeout_s: float = 30.0) -> list[dict]:
    """Poll ``ray.nodes()`` (connected driver) until exactly ``count`` nodes are alive."""
    import ray

    deadline = time.monotonic() + timeout_s
    alive: list[dict] = []
    while time.monotonic() < deadline:
        alive = [n for n in ray.nodes() if n["Alive"]]
        if len(alive) == count:
            return alive
        time.sleep(0.5)
    raise MultiNodeError(f"expected {count} alive Ray nodes within {timeout_s:.0f} s, "
                         f"saw {len(alive)}: {[n['NodeManagerAddress'] for n in alive]}")


def wait_for_node_dead(node_resource: str, timeout_s: float = 60.0) -> dict:
    """Poll ``ray.nodes()`` until the node offering custom resource ``node_resource`` is dead."""
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for node in ray.nodes():
            if not node["Alive"] and node_resource in (node.get("Resources") or {}):
                return node
        # A dead node's Resources can come back empty: match by what is *no longer* alive too.
        alive = [n for n in ray.nodes() if n["Alive"]]
        dead = [n for n in ray.nodes() if not n["Alive"]]
        if dead and not any(node_resource in (n.get("Resources") or {}) for n in alive):
            return dead[-1]
        time.sleep(0.5)
    raise MultiNodeError(f"the node with resource {node_resource!r} still looks alive after "
                         f"{timeout_s:.0f} s")
