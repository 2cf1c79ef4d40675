"""The pipeline on a real two-node Ray cluster on one machine, losing a node in the middle of the search.

A head (resource ``node_a``, 3 logical CPUs) and a second node (``node_b``, 2 logical CPUs) run as
separate ``ray start`` processes (tests/multinode_util.py); pipeline/run.py is submitted with
``ray job submit`` to the head, the way a user runs it on a remote cluster. Everything goes through
the session's SeaweedFS S3 store and MLflow (tests/fixtures_stack.py); the code reaches node b only
through the job's uploaded working directory.

- profiling: ``profile.placement=spread`` asks for the two actors on different nodes; SPREAD is a
  preference (a loaded node may take both), so the test asserts what is guaranteed: the actors ran on
  the cluster's nodes, every node that got an actor measured, one table came out;
- search: two Ray Train workers with ``placement_strategy=SPREAD`` (each rank records where it ran,
  ``search/placements/``), again a preference;
- once the search has checkpointed an epoch, node b is stopped. If a worker ran there, Ray Train sees the lost worker,
  restarts the worker group on what is left (the head has room for both workers: SPREAD is best
  effort), and the search continues from its last checkpoint -- no epoch is lost or trained twice --
  and the run finishes (derive, retrain);
- every URI the run recorded is an ``s3://`` URI: no stage handed another a local path;
- every stage's artifacts are in the store with their checksums, MLflow holds the parent run and one
  nested run per stage, and a second submission reuses every stage.

This is also the suite's end-to-end test of a submitted pipeline (tests/test_e2e_pipeline.py has
the bad-config and stop/resume cases): one full run serves both, to keep the suite's time.
"""
from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from pipeline.demo import cli_env, submit_command, write_runtime_env
from tests.fixtures_stack import store_for
from tests.test_e2e_pipeline import CONFIG, STAGES, TEST_OVERRIDES, _check_manifest, _sets, _tail, _wait_for

REPO = Path(__file__).resolve().parents[1]
SEARCH_EPOCHS = 6      # 1 warm-up; node b is stopped after the first checkpoint: epochs (seconds each) remain

MULTINODE_OVERRIDES = [
    # enough work per signature (20 repeats, one per task) that the later-starting actor gets a share
    "profile.actors=2", "profile.threads_per_actor=1", "profile.placement=spread", "profile.repeats=20",
    "profile.signatures_per_task=1",
    "search.workers=2", "search.cpus_per_worker=1", "search.data_cpus=1", "search.placement_strategy=SPREAD",
    "search.max_failures=2", f"search.epochs={SEARCH_EPOCHS}", "search.warmup_epochs=1",
]

_NODE_IDS = """
import json, sys
import ray
ray.init(address=sys.argv[1], log_to_driver=False)
ids = {}
for n in ray.nodes():
    for name in ("node_a", "node_b"):
        if n["Alive"] and name in (n.get("Resources") or {}):
            ids[name] = n["NodeID"]
print(json.dumps(ids), flush=True)
"""


def _uris(doc, path=""):
    """(where, value) of every string in a JSON document that names a location."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _uris(v, f"{path}.{k}")
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _uris(v, f"{path}[{i}]")
    elif isinstance(doc, str) and ("://" in doc or doc.startswith("/")):
        yield path, doc


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.drill
@pytest.mark.timeout(720)
def test_pipeline_spans_two_nodes_and_survives_losing_one(local_stack, tmp_path):
    from tests.multinode_util import two_node_cluster

    local_stack.up(("s3", "mlflow"))
    run_id = f"multinode-{uuid.uuid4().hex[:6]}"
    prefix = f"e2e/{run_id}"
    store = store_for(local_stack, prefix)
    run_store = store.child(f"runs/{run_id}")
    overrides = [*TEST_OVERRIDES, *MULTINODE_OVERRIDES, f"storage.uri=s3://{local_stack.bucket}/{prefix}",
                 f"tracking.experiment={run_id}"]

    with two_node_cluster(head_cpus=3, node_b_cpus=2, include_dashboard=True) as cluster:
        env = {**local_stack.env(("s3", "mlflow")), **cluster.auth_env, "RAY_DASHBOARD_URL": cluster.dashboard_url}
        ids_proc = subprocess.run([sys.executable, "-c", _NODE_IDS, cluster.address], cwd=REPO, capture_output=True,
                                  text=True, timeout=60, env={**cli_env(env), "PYTHONPATH": str(REPO)})
        node_ids = json.loads(ids_proc.stdout.strip().splitlines()[-1])
        assert set(node_ids) == {"node_a", "node_b"}, ids_proc.stdout + ids_proc.stderr
        id_a, id_b = node_ids["node_a"], node_ids["node_b"]

        runtime_env = write_runtime_env(tmp_path / "runtime_env.yaml", env)
        cmd = submit_command(CONFIG, run_id, env, runtime_env, extra_args=_sets(overrides), resume=False,
                             submission_id=f"{run_id}-job")
        log_path = tmp_path / "job.log"      # a file, not a pipe: nobody reads while we wait
        log = open(log_path, "w")
        job = subprocess.Popen(cmd, cwd=REPO, env=cli_env(env), stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            def search_placed_and_checkpointed():
                if job.poll() is not None:
                    raise AssertionError(f"the job ended before node b could be stopped:\n"
                                         f"{log_path.read_text()[-6000:]}")
                search = run_store.child("search")
                try:
                    placed = [search.get_json(k) for k in search.list("placements") if k.endswith(".json")]
                    rec = run_store.get_json("run.json") if run_store.exists("run.json") else {}
                    uri = rec.get("stages", {}).get("search", {}).get("checkpoint_uri")
                    if not uri or len({p["rank"] for p in placed}) < 2:
                        return None
                    ckpt = run_store.child(uri.split(f"runs/{run_id}/", 1)[1])
                    pointer = ckpt.get_json("latest.json") if ckpt.exists("latest.json") else None
                except Exception:  # noqa: BLE001 -- a half-written object: look again
                    return None
                return (placed, pointer) if pointer and pointer["epoch"] >= 1 else None

            placed, pointer = _wait_for(search_placed_and_checkpointed, 420,
                                        "both search workers placed and a first epoch checkpoint")
            assert {p["node_id"] for p in placed} <= {id_a, id_b}, placed
            assert pointer["epoch"] < SEARCH_EPOCHS
            cluster.stop_node_b()
            assert not cluster.node_b.alive()
            job.wait(timeout=480)
        finally:
            if job.poll() is None:
                job.kill()
            log.close()
        out = log_path.read_text()
        print(out[-20000:])                 # shown by pytest when an assertion below fails
        assert job.returncode == 0 and "succeeded" in out, out[-8000:]
        assert f"run {run_id} (tiny): finished" in out, out[-8000:]
        record = run_store.get_json("run.json")
        assert record["status"] == "finished", record
        manifests = {st: _check_manifest(run_store, st, record["stages"][st]["fingerprint"]) for st in STAGES}

        # a second submission reuses every stage (no Ray work) and says so; node b is gone, the head suffices
        again = subprocess.run(submit_command(CONFIG, run_id, env, runtime_env, extra_args=_sets(overrides),
                                              resume=False, submission_id=f"{run_id}-again"),
                               cwd=REPO, env=cli_env(env), capture_output=True, text=True, timeout=240)
        assert again.returncode == 0, _tail(again)
        for stage in STAGES:
            assert f"[{stage}] cached" in again.stdout, _tail(again)


    # profiling: the actors ran on the cluster's nodes (SPREAD prefers both, a loaded node may take
    # both), and the nodes that measured are among them and produced the one table
    profile = manifests["profile"]
    assert profile["actor_node_ids"] and set(profile["actor_node_ids"]) <= {id_a, id_b}, profile["actor_node_ids"]
    assert set(profile["results_per_node"]) <= {id_a, id_b} and sum(profile["results_per_node"].values()) > 0
    assert set(record["stages"]["profile"]["node_ids"]) <= {id_a, id_b} | set(profile["node_ids"])

    # search: ranks 0 and 1 started on the cluster's nodes (SPREAD prefers different ones). When a
    # rank was on node b, losing it restarted the group on the head from the last checkpoint, which
    # then trained exactly the remaining epochs; either way the search finished all its epochs.
    search = manifests["search"]
    assert search["epochs"] == SEARCH_EPOCHS
    first = [p for p in search["placements"] if p["start_epoch"] == search["placements"][0]["start_epoch"]][:2]
    assert sorted(p["rank"] for p in first) == [0, 1] and {p["node_id"] for p in first} <= {id_a, id_b}, first
    restarted = [p for p in search["placements"] if p["start_epoch"] > first[0]["start_epoch"]]
    if id_b in {p["node_id"] for p in first}:
        assert restarted, f"no worker restart after node b was stopped: {search['placements']}"
    if restarted:
        resumed_at = restarted[-1]["start_epoch"]
        last = [p for p in restarted if p["start_epoch"] == resumed_at]
        assert sorted(p["rank"] for p in last) == [0, 1] and {p["node_id"] for p in last} == {id_a}, last
        assert resumed_at >= pointer["epoch"] >= 1
        rank0 = run_store.child("search").get_json("workers/rank-0.json")
        assert [d["epoch"] for d in rank0["digests"]] == list(range(resumed_at + 1, SEARCH_EPOCHS + 1)), rank0
    assert set(record["stages"]["search"]["node_ids"]) >= {p["node_id"] for p in first}
    assert record["stages"]["search"]["attempts"] == 1    # recovered inside Ray Train, not by a re-run
    split, derive, retrain = manifests["split"], manifests["derive"], manifests["retrain"]
    assert split["counts"]["train"] > 0 and split["num_classes"] == 3
    assert any(k.endswith(".parquet") for k in split["artifacts"])
    assert profile["table_key"] == "latency_table.json" and profile["units"] == "ms"
    assert run_store.child("profile").get_json("latency_table.json")["format"] == "densenas-latency-table"
    assert "arch_params.json" in search["artifacts"]
    assert search["inputs"] == {"split": split["fingerprint"], "profile": profile["fingerprint"]}
    # derive scores the path with the search's cost (the profile table, in ms), not a MACs proxy
    assert derive["latency_units"] == "ms" and derive["predicted_latency"] > 0 and derive["one_line"]
    assert 0.0 <= retrain["metrics"]["test_top1"] <= 1.0
    assert retrain["measured_latency_ms"] > 0 or retrain["metrics"].get("measured_latency_ms", 0) > 0
    # the warm-up cache the search published is complete and shared under cache/warmup/
    assert store.exists(f"cache/warmup/{search['caches']['warmup']['fingerprint']}/_complete.json")
    assert run_store.get_json("derive/manifest.json")["timings"] == derive["timings"]   # not redone by `again`

    # MLflow: the parent run and one nested run per stage, finished, tagged with the stage
    from mlflow.tracking import MlflowClient

    client = MlflowClient(local_stack.mlflow_uri)
    parent_id = record["mlflow"]["parent_run_id"]
    assert parent_id, record["mlflow"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["densenas.run_id"] == run_id
    assert parent.data.params["search.lambda"] == "0.15"
    exp = client.get_experiment_by_name(run_id)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    by_stage = {r.data.tags.get("densenas.stage"): r for r in runs}
    assert set(STAGES) <= set(by_stage), sorted(by_stage)
    for stage in STAGES:
        r = by_stage[stage]
        assert r.info.status == "FINISHED", (stage, r.info.status)
        assert r.data.tags["densenas.fingerprint"] == record["stages"][stage]["fingerprint"]
        assert record["stages"][stage]["mlflow_run_id"] == r.info.run_id
    assert "test_top1" in by_stage["retrain"].data.metrics

    # every location the run recorded is in the S3 store (no local path handed between nodes)
    docs = {"run.json": record, **{f"{st}/manifest.json": m for st, m in manifests.items()}}
    local = [(name, where, value) for name, doc in docs.items() for where, value in _uris(doc)
             if not value.startswith("s3://") and not value.startswith(("http://", "https://"))]
    assert not local, local
