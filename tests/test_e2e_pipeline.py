"""End to end: pipeline/run.py submitted with `ray job submit` to the embedded stack.

- a bad config fails before any work starts, with the named error (fast; no Ray, no store);
- the tiny pipeline, shrunk by ``--set`` overrides, submitted with `ray job submit` and run to the
  end -- every stage's artifacts in the S3 store (SeaweedFS) with their checksums, MLflow's parent
  run plus one nested run per stage, a second submission served from the cache -- is checked by
  tests/test_multinode_pipeline.py, on a two-node cluster that loses a node mid-search (one full
  run serves both, to keep the suite's time);
- the same pipeline stopped with `ray job stop` in the middle of the search and resubmitted with
  ``--resume``: split and profile are reused (manifests untouched), the search continues from its
  last epoch checkpoint and finishes (slow, ray).

The slow test runs on a Ray head of the session's stack (module fixture, tests/fixtures_stack.py),
with its own store prefix and MLflow experiment. Budget on a quiet 2-core machine: about 3 minutes.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from pipeline.demo import cli_env, submit_command, write_runtime_env
from tests.fixtures_stack import store_for

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/tiny.yaml"
STAGES = ("split", "profile", "search", "derive", "retrain")

# configs/tiny.yaml shrunk to seconds per stage: 3 classes x 40 images, 2 profile repeats, a 3-epoch
# search (1 warm-up) on 2 DDP ranks, 1 retrain epoch. The machinery is the demo's, only smaller.
TEST_OVERRIDES = [
    "data.classes=3", "data.max_per_class=40", "data.test_max_per_class=12", "data.shard_size=200",
    "profile.warmup=1", "profile.repeats=2", "profile.report_paths=2",
    "search.epochs=3", "search.warmup_epochs=1", "search.batch_size=32",
    "retrain.epochs=1", "retrain.batch_size=32", "retrain.latency_warmup=1", "retrain.latency_repeats=3",
]


def _sets(items) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


# --------------------------------------------------------------------------- bad configs (fast)
def _run_file(args: list[str], tmp_path: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """pipeline/run.py as a file (how `ray job submit` starts it), with a store that must stay empty."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_", "DENSENAS_"))}
    env.update(DENSENAS_STORE=str(tmp_path / "store"), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
               RAY_ADDRESS="127.0.0.1:1")    # were Ray touched, it would fail loudly, not start one
    return subprocess.run([sys.executable, "pipeline/run.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _bad_space(tmp_path: Path) -> str:
    text = (REPO / "configs/spaces/tiny_mbconv.yaml").read_text()
    bad = text.replace("widths:      [16, 20, 24, 32, 40, 48, 64]", "widths:      [16, 8, 24, 32, 40, 48, 64]")
    assert bad != text, "configs/spaces/tiny_mbconv.yaml changed its widths line; update this test"
    path = tmp_path / "shrinking_space.yaml"
    path.write_text(bad)
    return str(path)


BAD_CONFIGS = {
    "unknown_key": (["search.lamda=0.3"], "search.lamda: unknown key; did you mean 'lambda'?"),
    "negative_lambda": (["search.lambda=-1"], "search.lambda: Input should be greater than or equal to 0"),
    "inconsistent_space": (["space={bad_space}"], "space: search space field 'widths[1]': width 8 shrinks from 16"),
    "missing_dataset_root": (["data.source=folder", "data.root={tmp}/no-such-imagenet"],
                             "data.root: dataset root"),
}


def _case_args(case: str, tmp_path: Path) -> tuple[list[str], str]:
    overrides, expected = BAD_CONFIGS[case]
    overrides = [o.format(bad_space=_bad_space(tmp_path) if "bad_space" in o else "", tmp=tmp_path) for o in overrides]
    return ["--config", CONFIG, "--run-id", "bad", *_sets(overrides)], expected


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_fails_before_any_work(case, tmp_path, monkeypatch, capsys):
    """In process (cheap): exit code 2, the named error, nothing written, Ray not started."""
    import ray

    from pipeline.run import main

    args, expected = _case_args(case, tmp_path)
    monkeypatch.setenv("DENSENAS_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: config {CONFIG}: ") and expected in err, err
    assert not (tmp_path / "store").exists() and not (tmp_path / "mlflow.db").exists()
    assert not ray.is_initialized()


@pytest.mark.timeout(150)
def test_bad_config_fails_before_any_work_as_a_job_entrypoint(tmp_path):
    """pipeline/run.py as a file, the way `ray job submit` starts it: same error, nothing started."""
    args, expected = _case_args("unknown_key", tmp_path)
    proc = _run_file(args, tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert expected in proc.stderr and proc.stderr.startswith(f"error: config {CONFIG}: "), proc.stderr
    assert not (tmp_path / "store").exists()
    assert "running" not in proc.stdout and "ray:" not in proc.stdout + proc.stderr


# --------------------------------------------------------------------------- the submitted pipeline (slow)
@pytest.fixture(scope="module")
def ray_stack(local_stack):
    """The session's SeaweedFS + MLflow, and a Ray head for this module (stopped after it)."""
    local_stack.up(("s3", "mlflow"))
    local_stack.up(("ray",))        # after s3/mlflow: jobs inherit their env from the head
    try:
        yield local_stack
    finally:
        local_stack.down(("ray",))


class Submission:
    """One test's run: its own store prefix and MLflow experiment on the shared stack."""

    def __init__(self, stack, tmp_path: Path, tag: str):
        self.stack = stack
        self.run_id = f"e2e-{tag}-{uuid.uuid4().hex[:6]}"
        self.prefix = f"e2e/{self.run_id}"
        self.store = store_for(stack, self.prefix)
        self.env = stack.env()
        self.runtime_env = write_runtime_env(tmp_path / "runtime_env.yaml", self.env)
        self.overrides = [*TEST_OVERRIDES, f"storage.uri=s3://{stack.bucket}/{self.prefix}",
                          f"tracking.experiment={self.run_id}"]

    def command(self, *, stages: str | None = None, resume: bool = False, wait: bool = True,
                submission_id: str | None = None) -> list[str]:
        extra = _sets(self.overrides) + (["--stages", stages] if stages else [])
        return submit_command(CONFIG, self.run_id, self.env, self.runtime_env, extra_args=extra, resume=resume,
                              wait=wait, submission_id=submission_id)

    def submit(self, timeout: float, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(**kw), cwd=REPO, env=cli_env(self.env), capture_output=True, text=True,
                              timeout=timeout)

    def job(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        cmd = [submit_command(CONFIG, "x", self.env, self.runtime_env)[0], "job", *args,
               "--address", self.env["RAY_DASHBOARD_URL"]]
        return subprocess.run(cmd, cwd=REPO, env=cli_env(self.env), capture_output=True, text=True, timeout=timeout)

    def run_store(self):
        return self.store.child(f"runs/{self.run_id}")


def _tail(proc: subprocess.CompletedProcess, n: int = 6000) -> str:
    return f"rc={proc.returncode}\n--- stdout\n{proc.stdout[-n:]}\n--- stderr\n{proc.stderr[-n:]}"


def _check_manifest(run_store, stage: str, fingerprint: str) -> dict:
    m = run_store.get_json(f"{stage}/manifest.json")
    assert m["state"] == "finished" and m["stage"] == stage and m["fingerprint"] == fingerprint
    assert m["artifacts"], f"{stage}: no artifacts listed"
    stage_store = run_store.child(stage)
    for key, info in m["artifacts"].items():
        data = stage_store.get_bytes(key)
        assert hashlib.sha256(data).hexdigest() == info["sha256"] and len(data) == info["size"], f"{stage}/{key}"
    return m


def _wait_for(predicate, timeout: float, what: str, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.drill
@pytest.mark.timeout(600)
def test_stopped_search_resumes_from_its_checkpoint(ray_stack, tmp_path):
    sub = Submission(ray_stack, tmp_path, "resume")
    epochs = 6                              # long enough that `ray job stop` lands in the middle
    sub.overrides.append(f"search.epochs={epochs}")
    stages = "split,profile,search"        # derive / retrain add nothing to what is checked here
    first_id = f"{sub.run_id}-a"
    accepted = sub.submit(timeout=120, stages=stages, wait=False, submission_id=first_id)
    assert accepted.returncode == 0, _tail(accepted)
    run_store = sub.run_store()

    def search_checkpoint():
        try:
            rec = run_store.get_json("run.json") if run_store.exists("run.json") else {}
        except Exception:
            return None
        s = rec.get("stages", {}).get("search", {})
        if s.get("state") in ("failed", "finished"):
            raise AssertionError(f"search {s['state']} before it could be stopped: {s.get('error')}")
        uri = s.get("checkpoint_uri")
        if not uri:
            return None
        ckpt = run_store.child(uri.split(f"runs/{sub.run_id}/", 1)[1])
        return ckpt.get_json("latest.json") if ckpt.exists("latest.json") else None

    pointer = _wait_for(search_checkpoint, 420, "the search's first epoch checkpoint")
    assert pointer["epoch"] >= 1
    stop = sub.job("stop", first_id, timeout=120)
    assert stop.returncode == 0, _tail(stop)
    def job_status() -> str:      # "Job '<id>' was stopped" / "... failed" / "... succeeded" / "... is running"
        proc = sub.job("status", first_id)
        return (proc.stdout + proc.stderr).lower()

    status = _wait_for(lambda: next((s for s in ("stopped", "failed", "succeeded") if s in job_status()), None),
                       90, "the stopped job's final state")
    assert status == "stopped", job_status()

    before = run_store.get_json("run.json")
    # SIGTERM is recorded as an interruption (or, when Ray's grace period ran out first, left running)
    assert before["stages"]["search"]["state"] in ("interrupted", "running"), before["stages"]["search"]
    assert not run_store.exists("search/manifest.json"), "a stopped search must not look finished"
    split_m, profile_m = (run_store.get_json(f"{s}/manifest.json") for s in ("split", "profile"))
    stopped_at = run_store.get_json(before["stages"]["search"]["checkpoint_uri"].split(f"runs/{sub.run_id}/", 1)[1]
                                    + "/latest.json")["epoch"]
    assert 1 <= stopped_at < epochs, stopped_at

    again = sub.submit(timeout=480, stages=stages, resume=True, submission_id=f"{sub.run_id}-b")
    assert again.returncode == 0, _tail(again)
    out = again.stdout
    assert "[split] cached" in out and "[profile] cached" in out, _tail(again)
    assert "[search] running" in out and "resuming from its checkpoint" in out, _tail(again)
    assert f"resumed at epoch {stopped_at}" in out, _tail(again)

    rec = run_store.get_json("run.json")
    assert rec["status"] == "finished"
    for stage, m in (("split", split_m), ("profile", profile_m)):
        assert rec["stages"][stage]["state"] == "cached"
        assert run_store.get_json(f"{stage}/manifest.json")["timings"] == m["timings"], f"{stage} was recomputed"
    s = rec["stages"]["search"]
    assert s["state"] == "finished" and s["resumed"] is True and s["attempts"] == 2, s
    search_m = _check_manifest(run_store, "search", s["fingerprint"])
    assert search_m["epochs"] == epochs
    # rank 0 of the resumed run trained only the epochs after the checkpoint
    rank0 = run_store.child("search").get_json("workers/rank-0.json")
    assert [d["epoch"] for d in rank0["digests"]] == list(range(stopped_at + 1, epochs + 1)), rank0["digests"]
    events = [h["event"] for h in rec["history"]]
    assert "resumed" in events and "search: running (resumed)" in events
