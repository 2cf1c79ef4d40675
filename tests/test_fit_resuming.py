"""jobs.train.fit_resuming: a Ray Train controller failure costs a new Train run from the checkpoint
pointer, not the stage. The first tests use a stand-in trainer whose ``fit()`` raises what Ray Train's
raises; the last one breaks a real search's controller (Ray Train, local store)."""
import pytest

pytest.importorskip("ray")

from ray.train import ControllerError, WorkerGroupError  # noqa: E402

from cluster.storage import open_store  # noqa: E402
from jobs.train import fit_resuming, latest_checkpoint, publish_latest  # noqa: E402


class Result:
    error = None


class FlakyController:
    """Each fit() publishes one epoch's pointer, then fails its controller while ``failures`` last."""

    def __init__(self, store, failures, error=None):
        self.store, self.failures, self.error, self.builds = store, failures, error, []

    def __call__(self, pointer, name):
        self.builds.append((pointer, name))
        return self

    def fit(self):
        pointer, name = self.builds[-1]
        epoch = (pointer["epoch"] if pointer else 0) + 1
        publish_latest(self.store, name, f"checkpoint_{epoch}", epoch, ["state.pt"])
        if self.failures:
            self.failures -= 1
            raise self.error or ControllerError(OSError("When uploading checkpoint_manager_snapshot.json: "
                                                        "connection refused"))
        return Result()


def test_a_controller_error_continues_in_a_new_run_from_the_pointer(tmp_path):
    store, said = open_store(str(tmp_path)), []
    trainer = FlakyController(store, failures=2)
    fit_resuming(trainer, store, "search-x", what="search", say=said.append, retries=2, wait_s=0)
    assert [name for _, name in trainer.builds] == ["search-x", "search-x-retry1", "search-x-retry2"]
    assert trainer.builds[0][0] is None
    assert [p["epoch"] for p, _ in trainer.builds[1:]] == [1, 2]      # each run starts at the last pointer
    assert latest_checkpoint(store)["epoch"] == 3
    assert len(said) == 2 and "controller failed (OSError" in said[0] and "continues from epoch 1" in said[0]


def test_a_repeating_controller_error_fails_with_the_way_out(tmp_path):
    store = open_store(str(tmp_path))
    trainer = FlakyController(store, failures=5)
    with pytest.raises(RuntimeError, match=r"controller failed 2 times .*--resume") as err:
        fit_resuming(trainer, store, "retrain-x", what="retrain", say=lambda m: None, retries=1, wait_s=0)
    assert isinstance(err.value.__cause__, ControllerError)
    assert len(trainer.builds) == 2 and latest_checkpoint(store)["epoch"] == 2   # nothing published is lost


def test_worker_errors_are_not_retried_here(tmp_path):
    store = open_store(str(tmp_path))
    trainer = FlakyController(store, failures=1, error=WorkerGroupError("rank 0 died", {0: RuntimeError("x")}))
    with pytest.raises(WorkerGroupError):
        fit_resuming(trainer, store, "search-x", what="search", say=lambda m: None, wait_s=0)
    assert len(trainer.builds) == 1


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_a_real_controller_failure_mid_search_continues_in_a_new_train_run(tmp_path):
    """End to end with Ray Train's own controller: once the search has published epoch 1, the path
    of its run's controller bookkeeping (``checkpoint_manager_snapshot.json``) becomes a directory, so
    the controller's next write fails (``ControllerError``, outside ``max_failures``), as a storage
    outage under the controller does. The stage goes on in ``<run>-retry1`` from the pointer and
    finishes every epoch once."""
    import json
    import shutil
    import threading
    import time

    import ray

    from jobs.search import SearchJobConfig
    from jobs.split import SplitConfig
    from tests.standalone import run_search, run_split

    split_store = open_store(str(tmp_path / "split"))
    manifest = run_split(SplitConfig(classes=4, max_per_class=40, test_max_per_class=10, val_fraction=0.25,
                                     shard_size=1000, seed=1, executor="local"), split_store)
    job = SearchJobConfig.model_validate(dict(workers=1, cpus_per_worker=1, max_failures=1, epochs=4,
                                              warmup_epochs=1, batch_size=16, seed=3, weights={"lr": 0.05},
                                              arch={"lr": 0.01}, cost="macs"))
    ckpt_dir = tmp_path / "stage" / "checkpoints"
    broken, stop = [], threading.Event()

    def break_the_controllers_bookkeeping():
        while not stop.is_set():
            latest = ckpt_dir / "latest.json"
            if latest.exists():
                run = json.loads(latest.read_text())["run"]
                snapshot = ckpt_dir / run / "checkpoint_manager_snapshot.json"
                if snapshot.is_file():
                    snapshot.unlink()
                    snapshot.mkdir()
                    broken.append(run)
                    return
            time.sleep(0.05)

    watcher = threading.Thread(target=break_the_controllers_bookkeeping, daemon=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
    try:
        watcher.start()
        out = run_search(job, "micro_mbconv", manifest, split_store, open_store(str(tmp_path / "stage")))
    finally:
        stop.set()
        ray.shutdown()
    assert broken, "the controller's snapshot never appeared: the drill did not fire"
    pointer = json.loads((ckpt_dir / "latest.json").read_text())
    assert pointer["run"] == f"{broken[0]}-retry1" and pointer["epoch"] == 4
    assert out["epochs"] == 4
    records = [json.loads(x) for x in (tmp_path / "stage" / "search_record.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    shutil.rmtree(ckpt_dir / broken[0], ignore_errors=True)


def _ray_checkpoint(tmp_path, epoch: int, state: bytes):
    import json

    import ray.train

    d = tmp_path / f"ray-epoch-{epoch}"
    d.mkdir()
    (d / "state.pt").write_bytes(state)
    (d / "meta.json").write_text(json.dumps({"epoch": epoch}))
    return ray.train.Checkpoint.from_directory(str(d))


@pytest.mark.parametrize("pointer_epoch, expected", [(3, b"epoch 3"), (2, b"ray epoch 2"), (None, b"ray epoch 2")])
def test_a_restarted_group_resumes_from_the_pointer_when_it_is_ahead_of_ray_trains_checkpoint(
        tmp_path, monkeypatch, pointer_epoch, expected):
    """A rank killed after rank 0 uploaded and published epoch 3 but before its own report reached the
    controller: Ray Train restores epoch 2, the pointer names epoch 3 (seen in the fault drill: epoch 3
    trained and logged twice). The newer complete checkpoint wins; a pointer not ahead changes nothing."""
    import ray.train

    from jobs.train import load_checkpoint_file

    store = open_store(str(tmp_path / "store"))
    if pointer_epoch is not None:
        store.put_bytes(f"search-x/epoch-{pointer_epoch:04d}/state.pt", f"epoch {pointer_epoch}".encode())
        publish_latest(store, "search-x", f"epoch-{pointer_epoch:04d}", pointer_epoch, ["state.pt"])
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: _ray_checkpoint(tmp_path, 2, b"ray epoch 2"))
    data, source = load_checkpoint_file("state.pt", store, pointer=None)
    assert data == expected
    assert ("Ray Train's checkpoint was epoch 2" in source) == (expected == b"epoch 3"), source


def test_an_unreachable_store_keeps_ray_trains_checkpoint(tmp_path, monkeypatch):
    import ray.train

    from jobs.train import load_checkpoint_file

    class DeadStore:
        def exists(self, key):
            raise OSError("connection refused")

    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: _ray_checkpoint(tmp_path, 2, b"ray epoch 2"))
    assert load_checkpoint_file("state.pt", DeadStore(), pointer=None)[0] == b"ray epoch 2"
