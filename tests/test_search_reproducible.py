"""The pipeline's search stage is reproducible: same split, same cost model, same config, seed and
worker count -> the same alpha/beta (to 1e-6) and the same derived network, fresh or after a worker
was killed mid-search and the group resumed from its last epoch checkpoint.

Needs the Train workers' in-memory, seeded batch order (``data_loading: memory`` in jobs/search.py):
Ray Data's streaming order differs between runs, and with it the search.
"""
import pytest
import torch

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(1200)]

ray = pytest.importorskip("ray")

from cluster.storage import open_store  # noqa: E402
from jobs.search import SearchJobConfig  # noqa: E402
from jobs.split import SplitConfig  # noqa: E402
from tests.standalone import run_search, run_split  # noqa: E402


JOB = dict(workers=2, cpus_per_worker=0.5, max_failures=1, data_cpus=0, data_loading="memory",
           epochs=3, warmup_epochs=1, batch_size=16, arch_batch_size=8, arch_steps_per_epoch=6, seed=5,
           weights={"lr": 0.05}, arch={"lr": 0.01}, cost="macs", target_latency=0.04, dual_lr=0.1)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    store = open_store(str(tmp_path_factory.mktemp("split")))
    manifest = run_split(SplitConfig(classes=4, max_per_class=40, test_max_per_class=10, val_fraction=0.25,
                                     shard_size=1000, seed=1, executor="local"), store)
    return manifest, store


def _search(split, root, **kw):
    manifest, split_store = split
    store = open_store(str(root))
    out = run_search(SearchJobConfig.model_validate(JOB), "micro_mbconv", manifest, split_store, store, **kw)
    return out, store.get_json("arch_params.json")


def _assert_same(a, b):
    (out_a, pa), (out_b, pb) = a, b
    assert out_a["derived"]["path"] == out_b["derived"]["path"]
    assert out_a["derived"]["blocks"] == out_b["derived"]["blocks"]
    for ma, mb in zip(pa["alphas"], pb["alphas"]):
        assert torch.allclose(torch.tensor(ma["alpha"]), torch.tensor(mb["alpha"]), atol=1e-6, rtol=0)
    for ba, bb in zip(pa["betas"], pb["betas"]):
        assert torch.allclose(torch.tensor(ba), torch.tensor(bb), atol=1e-6, rtol=0)
    assert out_a["metrics"]["lambda"] == pytest.approx(out_b["metrics"]["lambda"], abs=1e-9)


def test_search_stage_is_reproducible_fresh_and_after_a_mid_search_restart(cluster, split, tmp_path):
    first = _search(split, tmp_path / "a")
    assert first[0]["metrics"]["arch_steps"] == 12
    _assert_same(first, _search(split, tmp_path / "b"))
    marker = tmp_path / "killed-once"
    resumed = _search(split, tmp_path / "c",
                      drill={"rank": 1, "epoch": 2, "step": 1, "marker": str(marker)})
    assert marker.exists(), "the failure drill did not fire"
    _assert_same(first, resumed)
