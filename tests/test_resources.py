"""Resource requests are checked against the cluster before a Train job starts: an impossible request
fails at once with an error naming what is missing and what the cluster has."""
import pytest

from jobs.resources import ResourceRequestError, WorkerResources, check_resources

NODES = [{"CPU": 2.0}, {"CPU": 4.0, "GPU": 1.0, "accel": 2.0}]


def test_fitting_request_passes_and_returns_totals():
    totals = check_resources(WorkerResources(2, cpus_per_worker=2), nodes=NODES)
    assert totals == {"CPU": 6.0, "GPU": 1.0, "accel": 2.0}
    assert WorkerResources(2, 0.5).scaling_kwargs() == {"num_workers": 2, "use_gpu": False,
                                                        "resources_per_worker": {"CPU": 0.5},
                                                        "placement_strategy": "PACK"}


def test_placement_strategies_are_checked_like_ray_places_them():
    # STRICT_SPREAD: one worker per node; 3 workers on 2 nodes can never be placed
    with pytest.raises(ResourceRequestError, match="STRICT_SPREAD .* only 2 node"):
        check_resources(WorkerResources(3, 1, placement_strategy="STRICT_SPREAD"), nodes=NODES)
    check_resources(WorkerResources(2, 1, placement_strategy="STRICT_SPREAD"), nodes=NODES)
    # STRICT_PACK: all on one node; 2 x 2 CPUs fit the 4-CPU node, 2 x 3 CPUs fit none
    check_resources(WorkerResources(2, 2, placement_strategy="STRICT_PACK"), nodes=NODES)
    with pytest.raises(ResourceRequestError, match="STRICT_PACK"):
        check_resources(WorkerResources(2, 2.5, placement_strategy="STRICT_PACK"), nodes=NODES)
    # SPREAD is best effort: it fits wherever PACK fits
    check_resources(WorkerResources(3, 1, placement_strategy="SPREAD"), nodes=NODES)
    with pytest.raises(ValueError, match="placement_strategy"):
        WorkerResources(1, placement_strategy="ANYWHERE")


def test_missing_gpu_names_the_resource_and_the_cluster():
    with pytest.raises(ResourceRequestError) as e:
        check_resources(WorkerResources(2, 1, gpus_per_worker=1), nodes=NODES, what="search stage")
    msg = str(e.value)
    assert "search stage" in msg and "GPU (needs 2, cluster has 1)" in msg and "CPU=6" in msg
    assert e.value.missing == {"GPU": 1.0}


def test_cpu_reserve_for_data_and_custom_resources_count():
    with pytest.raises(ResourceRequestError, match=r"CPU \(needs 7, cluster has 6\)"):
        check_resources(WorkerResources(3, 2), reserve={"CPU": 1}, nodes=NODES)
    with pytest.raises(ResourceRequestError, match="custom resource"):
        check_resources(WorkerResources(1, 1, custom={"tpu": 1}), nodes=NODES)


def test_bundles_that_cannot_span_nodes_are_refused_even_when_totals_fit():
    # 2 x 3 CPUs = 6 = the total, but the 2-CPU node cannot hold a 3-CPU worker.
    with pytest.raises(ResourceRequestError, match="only 1 worker"):
        check_resources(WorkerResources(2, 3), nodes=NODES)


def test_autoscale_turns_the_error_into_a_warning():
    with pytest.warns(RuntimeWarning, match="autoscale"):
        check_resources(WorkerResources(8, 1), nodes=NODES, allow_autoscale=True)


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_live_cluster_refuses_an_impossible_request_fast():
    ray = pytest.importorskip("ray")
    import time

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        t0 = time.monotonic()
        with pytest.raises(ResourceRequestError, match=r"GPU \(needs 2, cluster has 0\)"):
            check_resources(WorkerResources(2, 0.5, gpus_per_worker=1))
        assert time.monotonic() - t0 < 10
        check_resources(WorkerResources(2, 0.5), reserve={"CPU": 1})
    finally:
        ray.shutdown()


def test_torch_trainer_passes_the_report_poll_interval_to_ray_trains_controller(monkeypatch, tmp_path):
    import os

    from pydantic import ValidationError

    from jobs.train import REPORT_POLL_ENV, TrainJobResources, torch_trainer

    monkeypatch.delenv(REPORT_POLL_ENV, raising=False)
    assert TrainJobResources().report_poll_s == 0.5
    job = TrainJobResources(workers=1, report_poll_s=0.25)
    torch_trainer(lambda config: None, {}, job.request(), use_gpu=False, run_name="poll", storage=(str(tmp_path), None),
                  max_failures=0, datasets=None, report_poll_s=job.report_poll_s)
    # Ray Train copies this variable from the driver's environment into its controller at fit()
    assert os.environ[REPORT_POLL_ENV] == "0.25"
    with pytest.raises(ValidationError, match="report_poll_s"):
        TrainJobResources(report_poll_s=0)
