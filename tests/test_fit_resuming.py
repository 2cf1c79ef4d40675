"""jobs.train.fit_resuming: a Ray Train controller failure costs a new Train run from the checkpoint
pointer, not the stage. The trainer here is a stand-in whose ``fit()`` raises what Ray Train's raises
(the end-to-end case, a SeaweedFS restart under a running search, is tests/test_faults.py)."""
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
