"""jobs.profile: Ray actors measure a space's latency table (dedupe, resume, actor loss, refusals, report)."""
import pytest

from cluster.storage import open_store
from densenas.latency import LatencyTable, LatencyTableError, head_signature, space_signatures
from densenas.profiling import device_fingerprint
from densenas.space import load_space
from jobs.context import StageContext
from densenas.latency import predict_latency
from densenas.latency_model import DEFAULT_REFERENCE, LatencyModel, table_protocol
from densenas.latency_report import sample_random_nets
from jobs.profile import (MEASUREMENTS_KEY, REPORT_KEY, SCATTER_KEY, TABLE_KEY, ProfileConfig, ProfileError,
                          ProfileInputs, Profiler, scaled_space)
from jobs.profile import run as profile_run

pytestmark = pytest.mark.ray

TINY = dict(device="cpu", actors=2, threads_per_actor=1, batch_size=1, warmup=1, repeats=3,
            signatures_per_task=2, save_every=4, num_classes=10, actor_start_timeout_s=90, task_timeout_s=90)


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def micro():
    return load_space("micro_mbconv")


@pytest.fixture(scope="module")
def first_run(ray_local, micro, tmp_path_factory):
    """One profile of micro_mbconv: 4 calibration nets and 5 held-out nets, shared by the tests that inspect it."""
    store = open_store(tmp_path_factory.mktemp("profile"))
    prof = Profiler(ProfileConfig(**TINY, calibration_paths=4, report_paths=5, report_rounds=2), micro, store,
                    log=lambda m: None)
    return prof, prof.run(), store


def _raw_signature_count(space, batch, num_classes):
    """Signatures before deduplication: one per (site, op), as the network would instantiate them."""
    n = 2  # stem, first layer
    for b in space.blocks[1:]:
        n += len(space.in_edges(b.index)) * len(space.head_ops) + (len(space.stacking_ops) if b.n_stacking else 0)
    return n + len(space.final_blocks) + 1


@pytest.mark.timeout(180)
def test_every_distinct_signature_measured_once(first_run, micro):
    prof, result, store = first_run
    distinct = space_signatures(micro, 1, 10)
    # micro has shared shapes (edges 0->1 and 0->2 feed two 8@8 blocks from the same source): dedupe matters
    assert head_signature(micro, "mbconv_k3_e3", 0, 1, 1) == head_signature(micro, "mbconv_k3_e3", 0, 2, 1)
    assert _raw_signature_count(micro, 1, 10) > len(distinct)
    assert result["measured_signatures"] == len(distinct) == result["entries"]
    # each report net is timed in 2 rounds
    assert sum(prof.qstats.per_actor_results.values()) == len(distinct) + 2 * result["measured_nets"]
    assert result["measured_nets"] == 4 + 5
    table = LatencyTable.from_json(store.get_bytes(TABLE_KEY).decode())
    assert set(table.entries) == set(distinct)
    assert all(st.count == 3 for st in table.entries.values())
    assert table.device["threads"] == 1 and table.device["batch"] == 1 and table.device["dtype"] == "float32"
    # The protocol every number of the stage was measured under is in the device record.
    proto = table_protocol(table)
    # Every number is a ratio to the reference workload, in the reference's ms fixed once for the table.
    assert proto.reference == DEFAULT_REFERENCE and proto.allocator == "steady" and proto.reference_ms > 0
    assert proto == ProfileConfig(**TINY).measurement_protocol().with_(reference_ms=proto.reference_ms)
    assert prof.reference_ms == proto.reference_ms
    table.check_compatible(micro, device=device_fingerprint("cpu", 1, "float32", 1), num_classes=10)


@pytest.mark.timeout(60)
def test_report_artifacts(first_run):
    _, result, store = first_run
    report = store.get_json(REPORT_KEY)
    assert report["n_nets"] == 5 and report["n_calibration_nets"] == 4
    roles = [r["role"] for r in report["rows"]]
    assert roles.count("held_out") == 5 and roles.count("calibration") == 4
    held = {r["key"] for r in report["rows"] if r["role"] == "held_out"}
    assert not held & {r["key"] for r in report["rows"] if r["role"] == "calibration"}  # held out for real
    for k in ("within_5pct", "within_10pct", "mape_pct", "spearman"):
        assert k in report["plain_sum"] and k in report["model"]
        assert f"plain_{k}" in result["metrics"] and f"model_{k}" in result["metrics"]
    assert all(r["measured"] > 0 and r["predicted"] > 0 and r["plain_sum"] > 0 for r in report["rows"])
    assert store.get_bytes(SCATTER_KEY)[:8] == b"\x89PNG\r\n\x1a\n"
    # The published table carries the fitted model: the search, derive and retrain stages load it as one.
    table = LatencyTable.from_json(store.get_bytes(TABLE_KEY).decode())
    assert isinstance(table, LatencyModel)
    assert table.calibration.to_dict()["scale"] == report["calibration"]["scale"]
    row = next(r for r in report["rows"] if r["role"] == "held_out")
    net = next(n for n in sample_random_nets(load_space("micro_mbconv"), 9, 0, 10) if n.key == row["key"])
    assert predict_latency(net.arch, table) == pytest.approx(row["predicted"])


@pytest.mark.timeout(180)
def test_second_run_measures_nothing_new(first_run, micro):
    """Resumable: the pipeline's call shape on the same store reuses every measurement."""
    _, first, store = first_run
    ctx = StageContext(run_id="r", stage="profile", store=store, run_store=store, printer=lambda m: None)
    again = profile_run(ProfileConfig(**TINY, calibration_paths=4, report_paths=5, report_rounds=2),
                        ProfileInputs("micro_mbconv"), ctx).model_dump()
    assert again["measured_signatures"] == 0 and again["reused_signatures"] == first["entries"]
    # every net of the first run (4 calibration + 5 held-out) is reused, none measured again
    assert again["measured_nets"] == 0 and again["reused_nets"] == 4 + 5 == first["measured_nets"]
    assert again["metrics"]["model_mape_pct"] == pytest.approx(first["metrics"]["model_mape_pct"])
    # The reuse key is the protocol (all but the statistic): another protocol is another measurement.
    doc = store.get_json(MEASUREMENTS_KEY)
    assert doc["protocol"] == ProfileConfig(**TINY).measurement_protocol().measurement_key()
    assert doc["protocol"]["repeats"] == 3 and len(doc["signatures"]) == first["entries"]


@pytest.mark.timeout(180)
def test_killed_actor_work_requeued_and_table_complete(ray_local, micro, tmp_path):
    store = open_store(tmp_path)
    killed = []

    def kill_a_busy_actor(event):
        # A working actor: busy with a batch if one is, else the ready one that just returned (it gets
        # the next batch at once). Never one still starting: that is another failure path.
        ready = [s for s in event["slots"] if s.ready]
        busy = [s for s in ready if s.busy_since is not None] or ready
        if not killed and busy:
            killed.append(busy[0].index)
            ray_local.kill(busy[0].handle, no_restart=True)

    cfg = ProfileConfig(**{**TINY, "repeats": 5}, calibration_paths=0, report_paths=0, max_actor_restarts=1)
    result = Profiler(cfg, micro, store, callbacks=[kill_a_busy_actor]).run()
    assert killed and result["actor_deaths"] >= 1
    assert result["requeued_batches"] >= 1 and result["replacement_actors"] == 1
    table = LatencyTable.from_json(store.get_bytes(TABLE_KEY).decode())
    table.check_compatible(micro, num_classes=10)  # complete: no missing signature
    assert len(table) == len(space_signatures(micro, 1, 10))


@pytest.mark.timeout(60)
def test_refusals(ray_local, micro, tmp_path):
    store = open_store(tmp_path)
    with pytest.raises(ProfileError, match="GPU"):
        profile_run(ProfileConfig(device="cuda", report_paths=0), ProfileInputs(micro), StageContext.standalone(store))
    with pytest.raises(ProfileError, match="CPU"):
        profile_run(ProfileConfig(threads_per_actor=64, report_paths=0), ProfileInputs(micro),
                    StageContext.standalone(store))
    # The search's side: a table of another space, or of another device, is refused.
    table = LatencyTable({s: {"mean": 1, "median": 1, "std": 0, "p10": 1, "p90": 1, "count": 1}
                          for s in space_signatures(micro, 1, 10)}, micro.space_hash(),
                         device_fingerprint("cpu", 1, "float32", 1))
    with pytest.raises(LatencyTableError, match="search space"):
        table.check_compatible(load_space("tiny_mbconv"))
    with pytest.raises(LatencyTableError, match="another device"):
        table.check_compatible(micro, device={"kind": "cuda", "name": "NVIDIA H100"})


def test_config_schema():
    cfg = ProfileConfig.model_validate({"workers": 3, "threads_per_worker": 2, "repeats": 10})
    assert (cfg.actors, cfg.threads_per_actor) == (3, 2)
    assert cfg.ray_resources() == {"CPU": 2.0}
    assert ProfileConfig(device="cuda").ray_resources() == {"CPU": 1.0, "GPU": 1.0}
    with pytest.raises(ValueError, match="repeat"):
        ProfileConfig.model_validate({"repeat": 10})
    with pytest.raises(ValueError):
        ProfileConfig(device="tpu")
    tiny = load_space("tiny_mbconv")
    assert scaled_space(tiny, 64).blocks[1].resolution == 2 * tiny.blocks[1].resolution
    with pytest.raises(ProfileError, match="input_size"):
        scaled_space(tiny, 33)
    # The pipeline's config section is this model (tiny.yaml uses the workers spelling).
    from pipeline.config import load_config

    assert load_config("configs/tiny.yaml", check=False).profile.actors == 2


def test_cli_help_runs():
    from jobs.profile import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
