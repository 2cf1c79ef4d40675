"""The real-cluster configs (cluster/launcher, cluster/kuberay) pass validation, and validation
catches what it claims to catch.

Launcher configs go through Ray's own ray-schema.json and validate_config (offline); the KubeRay
manifests through the structural schema of cluster/validate.py (the CRDs are not shipped).
Budget: about 5 s for the config tests; the two-node smoke test at the end is slow+ray (< 90 s).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from cluster import validate as cv

REPO = Path(__file__).resolve().parents[1]
AWS = REPO / "cluster" / "launcher" / "aws.yaml"
RAYCLUSTER = REPO / "cluster" / "kuberay" / "raycluster.yaml"
RAYJOB = REPO / "cluster" / "kuberay" / "rayjob.yaml"
ALL_CONFIGS = [AWS, RAYCLUSTER, RAYJOB]


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: p.name)
def test_shipped_config_is_valid(path):
    report = cv.validate_file(path)
    assert report.ok, report.problems
    assert "project rules" in report.checks


def test_launcher_config_passes_rays_published_schema_directly():
    # Independent of cluster.validate: the file against the schema inside the ray package.
    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(_load(AWS), json.loads(schema_path.read_text()))
    report = cv.validate_file(AWS)
    assert "ray prepare_config + validate_config" in report.checks


def test_launcher_schema_rejects_unknown_field_and_bad_worker_counts():
    doc = _load(AWS)
    doc["max_worker"] = 8  # typo of max_workers: ray-schema.json forbids unknown top-level keys
    problems = cv.validate_launcher_config(doc).problems
    assert any("ray-schema.json" in p and "max_worker" in p for p in problems)

    doc = _load(AWS)
    doc["available_node_types"]["gpu_worker"]["min_workers"] = 12  # > global max_workers
    problems = cv.validate_launcher_config(doc).problems
    assert any("validate_config" in p and "max_workers" in p for p in problems)


def test_launcher_sized_for_paper_and_token_auth():
    doc = _load(AWS)
    head = doc["available_node_types"][doc["head_node_type"]]
    assert head["resources"]["GPU"] == 0
    gpu = doc["available_node_types"]["gpu_worker"]
    assert gpu["resources"]["GPU"] == 1
    assert gpu["min_workers"] == cv.SEARCH_GPU_WORKERS == 4
    assert gpu["max_workers"] == cv.RETRAIN_GPU_WORKERS == 8
    assert any("pip install" in c and "densenas-ray" in c for c in doc["setup_commands"])
    assert all("RAY_AUTH_MODE=token" in c for c in doc["head_start_ray_commands"][1:]
               + doc["worker_start_ray_commands"][1:])

    small = copy.deepcopy(doc)
    small["available_node_types"]["gpu_worker"]["max_workers"] = 4
    assert any("retrain needs 8" in p for p in cv.check_project_rules(small, cv.KIND_LAUNCHER))
    no_auth = copy.deepcopy(doc)
    no_auth["docker"]["run_options"] = []
    no_auth["head_start_ray_commands"] = ["ray start --head"]
    no_auth["worker_start_ray_commands"] = ["ray start --address=$RAY_HEAD_IP:6379"]
    assert any("token authentication" in p for p in cv.check_project_rules(no_auth, cv.KIND_LAUNCHER))


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_kuberay_manifest_structure_and_sizing(path):
    doc = _load(path)
    assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"]
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    assert spec["authOptions"]["mode"] == "token"
    (group,) = spec["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (4, 4, 8)
    assert spec["enableInTreeAutoscaling"] is True
    assert isinstance(spec["headGroupSpec"]["rayStartParams"], dict)


def test_rayjob_entrypoint_and_shutdown():
    spec = _load(RAYJOB)["spec"]
    assert spec["entrypoint"] == "python pipeline/run.py --config configs/imagenet_mbconv.yaml"
    assert spec["shutdownAfterJobFinishes"] is True
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"]


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d.update(apiVersion="ray.io/v1alpha1"), "apiVersion"),
    (lambda d: d["spec"].pop("headGroupSpec"), "headGroupSpec"),
    (lambda d: d["spec"]["headGroupSpec"]["template"]["spec"].update(containers=[]), "containers"),
    (lambda d: d["spec"]["workerGroupSpecs"][0].pop("rayStartParams"), "rayStartParams"),
    (lambda d: d["spec"]["workerGroupSpecs"][0]["rayStartParams"].update({"num-gpus": 1}),
     "rayStartParams"),
    (lambda d: d["metadata"].update(name="DenseNAS_cluster"), "name"),
], ids=["apiVersion", "no-head", "no-containers", "no-rayStartParams", "non-string-param", "bad-name"])
def test_raycluster_schema_rejects_broken_structure(mutate, expected):
    doc = _load(RAYCLUSTER)
    mutate(doc)
    problems = cv.validate_kuberay_manifest(doc).problems
    assert problems and any(expected in p for p in problems), problems


def test_kuberay_rules_reject_missing_gpus_auth_and_shutdown():
    doc = _load(RAYCLUSTER)
    container = doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    for section in ("requests", "limits"):
        container["resources"][section].pop("nvidia.com/gpu")
    doc["spec"].pop("authOptions")
    problems = cv.validate_kuberay_manifest(doc).problems
    assert any("nvidia.com/gpu" in p for p in problems)
    assert any("token authentication" in p for p in problems)

    job = _load(RAYJOB)
    job["spec"]["shutdownAfterJobFinishes"] = False
    job["spec"]["entrypoint"] = "python train.py"
    problems = cv.validate_kuberay_manifest(job).problems
    assert any("shutdownAfterJobFinishes" in p for p in problems)
    assert any("pipeline/run.py" in p for p in problems)
    job = _load(RAYJOB)
    job["spec"].pop("entrypoint")
    assert any("entrypoint" in p for p in cv.validate_kuberay_manifest(job).problems)


def test_embedded_credentials_are_flagged():
    doc = _load(RAYCLUSTER)
    container = doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    container["env"] = [{"name": "AWS_SECRET_ACCESS_KEY", "value": "wJalrXUtnFEMI/K7MDENG"}]
    assert any("AWS_SECRET_ACCESS_KEY" in p for p in cv.validate_kuberay_manifest(doc).problems)

    launcher = _load(AWS)
    launcher["setup_commands"].append("export AWS_ACCESS_KEY_ID=AKIAABCDEFGHIJKLMNOP")
    problems = cv.check_project_rules(launcher, cv.KIND_LAUNCHER)
    assert any("access key id" in p for p in problems)
    assert any("AWS_ACCESS_KEY_ID" in p for p in problems)
    # References are fine: a secretKeyRef, a $VAR, a token file path.
    ok = {"env": [{"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}],
          "cmd": "AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY ray job submit"}
    assert cv.find_embedded_credentials(ok) == []


def test_cli_exit_codes(tmp_path, capsys):
    assert cv.main([str(p) for p in ALL_CONFIGS]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: ray.io/v1\nkind: RayJob\nmetadata: {name: x}\nspec: {}\n")
    assert cv.main([str(bad)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "entrypoint" in out
    not_yaml = tmp_path / "list.yaml"
    not_yaml.write_text("- a\n- b\n")
    assert not cv.validate_file(not_yaml).ok


_TWO_NODE_DRIVER = """
import json, sys, time
import ray
from tests.multinode_util import wait_for_alive_nodes, wait_for_node_dead

ray.init(address=sys.argv[1], log_to_driver=False)
wait_for_alive_nodes(2, 30)

@ray.remote(num_cpus=0)
def node_id():
    return ray.get_runtime_context().get_node_id()

ids = ray.get([node_id.options(resources={"node_a": 1}).remote(),
               node_id.options(resources={"node_b": 1}).remote()], timeout=45)
print(json.dumps({"ids": ids}), flush=True)
sys.stdin.readline()  # the test stops node b, then tells us to look
dead = wait_for_node_dead("node_b", timeout_s=30)
alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
print(json.dumps({"dead": dead["NodeID"], "alive": alive}), flush=True)
"""


def _next_json(stream) -> dict:
    """The driver's next JSON line. Ray also prints to the driver's stdout when a node dies ("(raylet)
    Raylet is terminated ...", whatever ``log_to_driver`` says): those lines are skipped."""
    for line in iter(stream.readline, ""):
        if line.startswith("{"):
            return json.loads(line)
    return {}


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(90)
def test_two_node_local_cluster_smoke():
    """tests/multinode_util.py: two `ray start` processes form one token-authenticated cluster,
    tasks pinned by custom resource land on different nodes, and a stopped node is seen dead.

    The driver runs in a subprocess: Ray's C++ core caches the auth token per process, so a driver
    connected to this token-authenticated cluster would break later local ``ray.init()`` calls of
    the pytest process (they start clusters with another token)."""
    import subprocess
    import sys

    from tests.multinode_util import two_node_cluster

    with two_node_cluster() as cluster:
        assert cluster.auth_env["RAY_AUTH_MODE"] == "token"
        env = {**cluster.driver_env(), "PYTHONPATH": str(REPO)}
        env.pop("RAY_ADDRESS", None)
        driver = subprocess.Popen([sys.executable, "-c", _TWO_NODE_DRIVER, cluster.address], cwd=REPO, env=env,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            first = _next_json(driver.stdout)
            id_a, id_b = first["ids"]
            assert id_a != id_b
            cluster.stop_node_b()
            assert not cluster.node_b.alive()
            driver.stdin.write("go\n")
            driver.stdin.flush()
            second = _next_json(driver.stdout)
            assert second["dead"] == id_b
            assert second["alive"] == [id_a]
            assert driver.wait(timeout=60) == 0
        finally:
            if driver.poll() is None:
                driver.kill()
    assert not cluster.head.alive()


def test_remote_clusters_doc_matches_the_configs():
    doc = (REPO / "docs" / "remote_clusters.md").read_text()
    for path in ALL_CONFIGS:
        assert str(path.relative_to(REPO)) in doc
    assert _load(RAYJOB)["spec"]["entrypoint"] in doc
    for needle in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                   "MLFLOW_TRACKING_URI", "storage:\n  uri: s3://", "tracking:\n  uri:",
                   "ray job submit --working-dir .", "ray job logs -f", "ray job stop",
                   "--resume --run-id", "RAY_AUTH_MODE=token"):
        assert needle in doc, needle
