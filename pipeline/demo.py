"""``python -m pipeline demo``: the main job on the embedded default, end to end.

1. Start (or reuse) the local stack (``cluster.local``: SeaweedFS S3 + MLflow server + Ray head,
   all on loopback; state in ``.local-stack/``, or ``$DENSENAS_STACK_DIR``).
2. Submit ``pipeline/run.py --config configs/tiny.yaml --run-id tiny [--resume]`` (``--resume`` when
   the run already exists in the store) with
   ``ray job submit --working-dir .`` -- the same command a user runs against a real cluster --
   with the stack's env for the CLI (``RAY_AUTH_MODE=token``, the token path) and a runtime_env
   (written to a 0600 file, not the command line) carrying AWS_* / MLFLOW_TRACKING_URI /
   DENSENAS_STORE to the job. .venv, .git, .local-stack and stores are excluded from the upload.
3. Follow the job's logs (``ray job submit`` streams them), then print where to look: the MLflow
   UI, the artifact URIs and the derived network with its accuracy and latency.

The run id is stable (the config's name), so a second ``demo`` reuses every finished stage.
The stack is left running (stop it with ``python -m cluster.local down``).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import yaml

from pipeline.config import REPO_ROOT, ConfigError, load_config
from pipeline.records import default_run_id

# Forwarded to the job (the job's own process needs them; the head was started without them).
JOB_ENV_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL",
                "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_TRACKING_URI", "DENSENAS_STORE")
# Not uploaded with --working-dir: environments, VCS, local state, stores, caches.
UPLOAD_EXCLUDES = [".venv", ".git", ".local-stack", "runs-store", "runs", "mlruns", "mlflow.db",
                   "*.egg-info", "**/__pycache__", ".pytest_cache", ".state", "build", "dist", "*.log",
                   "shared"]


def _ray_cli() -> str:
    cand = Path(sys.executable).with_name("ray")
    found = str(cand) if cand.exists() else shutil.which("ray")
    if not found:
        raise RuntimeError("the `ray` CLI is not installed next to this Python; run `make setup` "
                           "(it installs ray[default])")
    return found


def submit_command(config: str, run_id: str, stack_env: dict[str, str], runtime_env_file: Path, *,
                   extra_args: Sequence[str] = (), resume: bool = True, wait: bool = True,
                   submission_id: str | None = None) -> list[str]:
    """The ``ray job submit`` command line the demo runs (the job's Python is this venv's).

    ``extra_args`` go to pipeline/run.py (e.g. ``--set search.epochs=2``); ``wait=False`` returns
    once the job is accepted (follow it with ``ray job status / logs``, stop it with ``ray job stop``)."""
    return [_ray_cli(), "job", "submit", "--address", stack_env["RAY_DASHBOARD_URL"],
            "--working-dir", str(REPO_ROOT), "--runtime-env", str(runtime_env_file),
            "--submission-id", submission_id or f"{run_id}-{int(time.time())}",
            *([] if wait else ["--no-wait"]), "--",
            sys.executable, "pipeline/run.py", "--config", config, "--run-id", run_id,
            *(["--resume"] if resume else []), *extra_args]


def cli_env(stack_env: dict[str, str]) -> dict[str, str]:
    """The environment for the ``ray job`` CLI: the stack's (token auth) without ``RAY_ADDRESS``
    (the CLI talks to the dashboard given by ``--address``; the job joins through its own env)."""
    env = {**os.environ, **stack_env}
    env.pop("RAY_ADDRESS", None)
    return env


def write_runtime_env(path: Path, stack_env: dict[str, str]) -> Path:
    doc = {"env_vars": {k: stack_env[k] for k in JOB_ENV_KEYS if k in stack_env} | {"PYTHONUNBUFFERED": "1"},
           "excludes": UPLOAD_EXCLUDES}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)   # it holds S3 credentials
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(doc, f)
    return path


def run_demo(config: str = "configs/tiny.yaml", run_id: str | None = None, timeout_s: float = 1800) -> int:
    t0 = time.monotonic()
    try:
        cfg = load_config(REPO_ROOT / config if not Path(config).is_absolute() else config)
    except ConfigError as e:
        print(f"error: config {config}: {e}", file=sys.stderr)
        return 2
    run_id = run_id or default_run_id(cfg.name)
    try:
        from cluster.local import LocalStack, StackError
    except ImportError:
        print("error: cluster/local.py (the local stack) is not in this checkout", file=sys.stderr)
        return 2

    print("demo: starting the local stack (SeaweedFS + MLflow + Ray head) ...", flush=True)
    stack = LocalStack()
    try:
        stack.up()
    except StackError as e:
        print(f"error: local stack: {e}", file=sys.stderr)
        return 2
    stack_env = stack.env()
    runtime_env = write_runtime_env(stack.state_dir / "demo_runtime_env.yaml", stack_env)
    # --resume continues an existing run (and is an error for a run id that never existed)
    cmd = submit_command(config, run_id, stack_env, runtime_env, resume=_run_exists(run_id, stack_env))
    print(f"demo: submitting run {run_id!r}:\n  {' '.join(cmd)}", flush=True)
    env = cli_env(stack_env)
    try:
        rc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, timeout=timeout_s).returncode
    except subprocess.TimeoutExpired:
        print(f"error: the job did not finish within {timeout_s:.0f} s; it keeps running on the stack: "
              f"`ray job list --address {stack_env['RAY_DASHBOARD_URL']}`; rerun the demo to resume it",
              file=sys.stderr)
        return 1
    print(f"\ndemo: job exited with {rc} after {time.monotonic() - t0:.0f} s", flush=True)
    _where_to_look(run_id, stack_env)
    return rc


def _run_exists(run_id: str, stack_env: dict[str, str]) -> bool:
    from pipeline.records import run_exists
    from pipeline.runtime import open_store

    os.environ.update({k: stack_env[k] for k in JOB_ENV_KEYS if k in stack_env})
    try:
        return run_exists(open_store(stack_env.get("DENSENAS_STORE", "")), run_id)
    except Exception:  # noqa: BLE001 -- the job's own checks report an unusable store
        return False


def _where_to_look(run_id: str, stack_env: dict[str, str]) -> None:
    from pipeline.records import RunNotFound, format_inspect, format_status, inspect_run, RunRecord
    from pipeline.runtime import open_store

    os.environ.update({k: stack_env[k] for k in JOB_ENV_KEYS if k in stack_env})
    store_uri = stack_env.get("DENSENAS_STORE", "")
    print(f"MLflow UI:      {stack_env.get('MLFLOW_TRACKING_URI')}")
    print(f"Ray dashboard:  {stack_env.get('RAY_DASHBOARD_URL')}")
    print(f"artifacts:      {store_uri.rstrip('/')}/runs/{run_id}/  (S3 endpoint {stack_env.get('AWS_ENDPOINT_URL')}; "
          f"`source {stack_env.get('DENSENAS_STACK_DIR', '.local-stack')}/env.sh` for credentials)")
    try:
        store = open_store(store_uri)
        print(format_status(RunRecord.load(store, run_id).doc))
        print(format_inspect(inspect_run(store, run_id)))
    except (RunNotFound, Exception) as e:  # the summary is best effort; the job's exit code is the verdict
        print(f"(could not read the run record: {type(e).__name__}: {e})")
    print("again: `python -m pipeline demo` reuses every finished stage; stop the stack: "
          "`python -m cluster.local down`")
