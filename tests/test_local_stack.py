"""cluster.local: ports, files, loopback-only and authenticated SeaweedFS, and the CLI end to end."""
from __future__ import annotations

import http.client
import json
import os
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cluster.local import LocalStack, StackError, StackPorts
from tests.fixtures_stack import *  # noqa: F401,F403 -- session fixtures (local_stack, stack_s3)

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)


def test_ports_from_base_and_overrides():
    ports = StackPorts.from_base(20000, s3=21000)
    assert ports.s3 == 21000 and ports.mlflow == 20001 and ports.ray == 20002
    assert (ports.ray_min_worker, ports.ray_max_worker) == (20100, 20299)
    assert StackPorts.parse("gcs=25000,dashboard=25001", base=24000).ray_dashboard == 25001
    with pytest.raises(StackError, match="both"):
        StackPorts.from_base(20000, mlflow=20000)
    with pytest.raises(StackError, match="unknown port"):
        StackPorts.from_base(20000, nonsense=1)
    with pytest.raises(StackError, match="worker range"):
        StackPorts.from_base(20000, s3=20150)


def test_state_files_are_private(stack_s3):
    state = stack_s3.state_dir
    for name in ("credentials.json", "identities.json", "env.sh"):
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
    env_text = (state / "env.sh").read_text()
    creds = stack_s3.credentials()
    assert f"export AWS_ENDPOINT_URL=http://127.0.0.1:{stack_s3.ports.s3}" in env_text
    assert "export DENSENAS_STORE=s3://densenas/artifacts" in env_text
    assert creds["secret_key"] in env_text  # what `source env.sh` needs; hence 0600
    # credentials are generated once and reused
    assert LocalStack(state).credentials() == creds


def _listening_addresses(pid: int) -> set[str]:
    """Local addresses (hex, as /proc writes them) of the LISTEN sockets owned by ``pid``."""
    return {addr for addr, _ in _listening(pid)}


def test_seaweedfs_loopback_only_auth_on_no_autocreate(stack_s3):
    pid = stack_s3.status()["s3"].pid
    addresses = _listening_addresses(pid)
    assert addresses == {"0100007F"}, f"weed listens beyond 127.0.0.1: {addresses}"
    # anonymous requests are refused (auth on)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{stack_s3.s3_endpoint}/densenas/", timeout=5)
    assert refused.value.code == 403
    # buckets are not auto-created: a put to an unknown bucket fails
    client = stack_s3._s3_client()
    with pytest.raises(Exception, match="NoSuchBucket"):
        client.put_object(Bucket="not-created", Key="k", Body=b"v")
    assert "densenas" in [b["Name"] for b in client.list_buckets()["Buckets"]]


def test_up_is_idempotent_and_refuses_busy_ports(stack_s3, tmp_path):
    pid = stack_s3.status()["s3"].pid
    stack_s3.up(("s3",))
    assert stack_s3.status()["s3"].pid == pid  # reused, not restarted
    # another stack that wants the same S3 port gets a clear error instead of a half-started server
    other = LocalStack(tmp_path / "other", StackPorts.free(), verbose=False)
    other.ports = StackPorts(**{**other.ports.to_dict(), "s3": stack_s3.ports.s3})
    with pytest.raises(StackError, match="already in use"):
        other.up(("s3",))


def _cli(*args: str, state_dir: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_"))}
    return subprocess.run([sys.executable, "-m", "cluster.local", *args, "--state-dir", str(state_dir)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.ray
def test_cli_up_status_down_with_ray(tmp_path):
    """`python -m cluster.local up/status/down` with Ray, an idempotent second up, and a
    `ray job submit` that authenticates with the token from env.sh."""
    state = tmp_path / "stack"
    ports = StackPorts.free()
    spec = ",".join(f"{k}={v}" for k, v in ports.to_dict().items())
    try:
        first = _cli("up", "--ports", spec, "--services", "s3,ray", state_dir=state)
        assert first.returncode == 0, first.stdout + first.stderr
        second = _cli("up", "--services", "s3,ray", state_dir=state)  # ports remembered in ports.json
        assert second.returncode == 0, second.stdout + second.stderr
        assert "already running" in second.stdout and "started pid" not in second.stdout

        status = _cli("status", "--json", state_dir=state)
        assert status.returncode == 0, status.stderr
        doc = json.loads(status.stdout)
        assert doc["services"]["ray"]["healthy"] and doc["services"]["s3"]["healthy"]
        assert not doc["services"]["mlflow"]["running"]
        assert doc["ports"]["ray"] == ports.ray

        env_lines = (state / "env.sh").read_text()
        assert "RAY_AUTH_MODE=token" in env_lines and f"RAY_ADDRESS=127.0.0.1:{ports.ray}" in env_lines
        # the dashboard refuses requests without the token
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{ports.ray_dashboard}/api/version", timeout=5)
        assert refused.value.code in (401, 403)
        # `source env.sh && ray job submit ...` works
        job_dir = tmp_path / "job"
        job_dir.mkdir()
        (job_dir / "hello.py").write_text("import os\nprint('JOB-OK', os.environ.get('DENSENAS_STORE'))\n")
        submit = subprocess.run(
            ["bash", "-c", f"set -a; . {state / 'env.sh'}; set +a; "
                           f"{Path(sys.executable).parent / 'ray'} job submit --working-dir {job_dir} -- python hello.py"],
            cwd=REPO, capture_output=True, text=True, timeout=180)
        assert submit.returncode == 0 and "JOB-OK s3://densenas/artifacts" in submit.stdout, submit.stdout[-3000:] + submit.stderr[-3000:]
    finally:
        down = _cli("down", state_dir=state)
    assert down.returncode == 0, down.stderr
    assert "stopped" in down.stdout
    after = json.loads(_cli("status", "--json", state_dir=state).stdout)
    assert not any(s["running"] for s in after["services"].values())
    # nothing of ours is left: no process mentions the state dir or the Ray temp dir
    needles = (str(state).encode(), str(LocalStack(state, verbose=False).ray_temp_dir).encode())
    leftovers = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
                if any(needle in cmdline for needle in needles):
                    leftovers.append(proc.name)
            except OSError:
                pass
    assert not leftovers, leftovers


# Methods a tokenless client tries on each Ray port: one per gRPC service Ray serves (GCS, raylet,
# object manager, core workers, dashboard agent). Without the token each must be refused
# (UNAUTHENTICATED) before any handler runs; UNIMPLEMENTED means "not this port's service".
_GRPC_PROBES = ("/ray.rpc.NodeInfoGcsService/GetAllNodeInfo", "/ray.rpc.JobInfoGcsService/GetAllJobInfo",
                "/ray.rpc.NodeManagerService/GetNodeStats", "/ray.rpc.ObjectManagerService/Pull",
                "/ray.rpc.CoreWorkerService/GetCoreWorkerStats", "/ray.rpc.ReporterService/GetTraceback",
                "/ray.rpc.MetricsAgentService/HealthCheck")


def _host_of(addr_hex: str) -> str:
    """The address to reach a listener at: its own IPv4 address, or loopback for a wildcard / IPv6 one."""
    if len(addr_hex) == 8 and addr_hex != "00000000":
        return ".".join(str(b) for b in reversed(bytes.fromhex(addr_hex)))
    return "127.0.0.1"


def _tokenless_verdict(port: int, host: str = "127.0.0.1") -> str:
    """How a port answers a client without the token: '...refused', or what it did instead."""
    import grpc

    grpc_seen = "no known Ray gRPC service"
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        for method in _GRPC_PROBES:
            try:
                channel.unary_unary(method)(b"", timeout=3)
                return f"grpc answered {method} without a token"
            except grpc.RpcError as e:
                code = e.code()
                if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    return "grpc-refused"
                if code == grpc.StatusCode.UNIMPLEMENTED:
                    continue
                grpc_seen = f"grpc {code.name} on {method}"
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                    break               # not a gRPC server (HTTP): ask it over HTTP
                return f"{grpc_seen} (the call got past authentication)"
    try:
        urllib.request.urlopen(f"http://{host}:{port}/", timeout=3)
        return f"{grpc_seen}; http answered without a token"
    except urllib.error.HTTPError as e:
        return "http-refused" if e.code in (401, 403) else f"{grpc_seen}; http {e.code}"
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        return f"{grpc_seen}; no http answer ({type(e).__name__})"


# LISTEN addresses (as /proc writes them) that only this host can reach: 127.0.0.1, ::1, ::ffff:127.0.0.1
_LOOPBACK_HEX = ("0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F")


@pytest.mark.slow
@pytest.mark.ray
def test_ray_ports_are_loopback_or_refuse_tokenless_clients(tmp_path):
    """Every port of the stack's Ray listens on loopback only. ``--node-ip-address 127.0.0.1`` alone does
    not do it (Ray 2.60 swaps a loopback node address for the host's: the client server, the runtime-env
    agent and the agent's HTTP port then bound 192.0.2.x, the metrics export server 0.0.0.0 and answered
    anyone, the gRPC servers 0.0.0.0); with Ray's single-node switch the node address stays 127.0.0.1
    and every server binds it (cluster/local.py, ``RAY_SINGLE_NODE_ENV``). Should a Ray upgrade open a
    port beyond loopback again, that port must at least refuse a client without the token."""
    stack = LocalStack(tmp_path / "stack", StackPorts.free(), verbose=False)
    try:
        stack.up(("ray",))
        import time as _time

        from cluster.local import _pids_mentioning, _session_pids

        leader = stack.status()["ray"].pid
        deadline = _time.monotonic() + 60
        while True:   # the dashboard agent and its children open their ports after `up` returns
            pids = set(_session_pids(leader)) | set(_pids_mentioning(str(stack.ray_temp_dir)))
            ports = {port: addr for pid in pids for addr, port in _listening(pid)}
            if {stack.ports.ray_metrics, stack.ports.ray_client, stack.ports.ray_runtime_env,
                    stack.ports.ray_agent_http, stack.ports.ray_agent_grpc} <= set(ports) or _time.monotonic() > deadline:
                break
            _time.sleep(1)
        listening: dict[int, set[str]] = {}
        for pid in pids:
            for addr, port in _listening(pid):
                listening.setdefault(port, set()).add(addr)
        print("Ray LISTEN sockets:", {p: sorted(a) for p, a in sorted(listening.items())})
        for name in ("ray_metrics", "ray_client", "ray_runtime_env", "ray_agent_http", "ray_dashboard"):
            port = getattr(stack.ports, name)
            assert port in listening, f"{name} port {port} is not listening"
            assert listening[port] <= set(_LOOPBACK_HEX), f"{name} port {port} listens on {sorted(listening[port])}"
        assert stack.ports.ray in listening and len(listening) >= 8, listening
        exposed = {port: next(a for a in sorted(addrs) if a not in _LOOPBACK_HEX)
                   for port, addrs in listening.items() if not addrs <= set(_LOOPBACK_HEX)}
        verdicts = {port: _tokenless_verdict(port, _host_of(addr)) for port, addr in sorted(exposed.items())}
        open_ports = {p: v for p, v in verdicts.items() if not v.endswith("refused")}
        assert not open_ports, f"Ray ports that serve a client without the token: {open_ports}"
        assert not exposed, f"Ray ports beyond loopback (each refuses a tokenless client): {verdicts}"
    finally:
        stack.down()


def _listening(pid: int) -> set[tuple[str, int]]:
    """(local address hex, port) of the LISTEN sockets owned by ``pid``."""
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return set()
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                addr, port = fields[1].split(":")
                out.add((addr, int(port, 16)))
    return out
