"""Validate the real-cluster configs: the Ray cluster-launcher YAML and the KubeRay manifests.

    python -m cluster.validate cluster/launcher/aws.yaml cluster/kuberay/*.yaml

Two kinds of check, and they are not equally strong (say which when you report a result):

- Ray cluster-launcher configs are checked against the JSON schema Ray itself ships
  (``ray/autoscaler/ray-schema.json``), first as written and then after Ray's own
  ``prepare_config`` has merged the provider defaults, with ``validate_config`` -- exactly what
  ``ray up`` does before it touches the cloud. Both run offline.
- KubeRay CRDs are not shipped in any installed package, so RayCluster / RayJob manifests are
  checked against a small *structural* JSON schema written here (``RAYCLUSTER_SPEC_SCHEMA``,
  ``RAYJOB_SCHEMA``): apiVersion ray.io/v1, kind, metadata.name, head/worker groups with pod
  templates and containers, rayStartParams, GPU resources, RayJob entrypoint and cluster spec.
  It catches wrong nesting and missing fields, not every field the operator would reject.

On top of the schemas, project rules (``check_project_rules``): GPU workers sized for the paper
(at least 4 for search, room for 8 for retrain), Ray token authentication switched on
deliberately, and no credential values written into the file (they come from the environment or
Kubernetes Secrets).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

# The paper's sizes: the search ran on 4 GPUs, the retrain on 8.
SEARCH_GPU_WORKERS = 4
RETRAIN_GPU_WORKERS = 8

KIND_LAUNCHER = "ray-cluster-launcher"
KIND_RAYCLUSTER = "RayCluster"
KIND_RAYJOB = "RayJob"


class ConfigValidationError(ValueError):
    """A cluster config failed validation; ``problems`` lists every reason found."""

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{path}: {len(self.problems)} problem(s):\n{lines}")


@dataclass
class ValidationReport:
    """What was checked for one file and what was wrong with it."""

    path: str
    kind: str
    checks: list[str] = field(default_factory=list)  # names of the checks that ran
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_if_failed(self) -> "ValidationReport":
        if self.problems:
            raise ConfigValidationError(self.path, self.problems)
        return self


# --------------------------------------------------------------------------------------------
# KubeRay structural schema (hand-written: the CRDs are not available offline)
# --------------------------------------------------------------------------------------------

_QUANTITY = {"type": ["string", "integer", "number"]}

_CONTAINER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["name", "image"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "image": {"type": "string", "minLength": 1},
        "env": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string"}, "value": {"type": "string"},
                               "valueFrom": {"type": "object"}},
            },
        },
        "envFrom": {"type": "array", "items": {"type": "object"}},
        "resources": {
            "type": "object",
            "properties": {
                "requests": {"type": "object", "additionalProperties": _QUANTITY},
                "limits": {"type": "object", "additionalProperties": _QUANTITY},
            },
            "additionalProperties": False,
        },
        "ports": {"type": "array", "items": {"type": "object", "required": ["containerPort"]}},
    },
}

_POD_TEMPLATE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {
                "containers": {"type": "array", "minItems": 1, "items": _CONTAINER_SCHEMA},
                "volumes": {"type": "array", "items": {"type": "object", "required": ["name"]}},
            },
        },
    },
}

# rayStartParams values are strings in the CRD (map[string]string).
_RAY_START_PARAMS_SCHEMA = {"type": "object", "additionalProperties": {"type": "string"}}

RAYCLUSTER_SPEC_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["headGroupSpec", "workerGroupSpecs"],
    "properties": {
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": {"type": "object"},
        "authOptions": {
            "type": "object",
            "properties": {"mode": {"enum": ["token", "disabled"]}},
        },
        "headGroupSpec": {
            "type": "object",
            "required": ["rayStartParams", "template"],
            "properties": {
                "serviceType": {"type": "string"},
                "rayStartParams": _RAY_START_PARAMS_SCHEMA,
                "template": _POD_TEMPLATE_SCHEMA,
            },
        },
        "workerGroupSpecs": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["groupName", "rayStartParams", "template"],
                "properties": {
                    "groupName": {"type": "string", "minLength": 1},
                    "replicas": {"type": "integer", "minimum": 0},
                    "minReplicas": {"type": "integer", "minimum": 0},
                    "maxReplicas": {"type": "integer", "minimum": 0},
                    "rayStartParams": _RAY_START_PARAMS_SCHEMA,
                    "template": _POD_TEMPLATE_SCHEMA,
                },
            },
        },
    },
}

_METADATA_SCHEMA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}},
}

RAYCLUSTER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": KIND_RAYCLUSTER},
        "metadata": _METADATA_SCHEMA,
        "spec": RAYCLUSTER_SPEC_SCHEMA,
    },
}

RAYJOB_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": KIND_RAYJOB},
        "metadata": _METADATA_SCHEMA,
        "spec": {
            "type": "object",
            "required": ["entrypoint", "shutdownAfterJobFinishes", "rayClusterSpec"],
            "properties": {
                "entrypoint": {"type": "string", "minLength": 1},
                "runtimeEnvYAML": {"type": "string"},
                "shutdownAfterJobFinishes": {"type": "boolean"},
                "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                "backoffLimit": {"type": "integer", "minimum": 0},
                "submitterPodTemplate": _POD_TEMPLATE_SCHEMA,
                "rayClusterSpec": RAYCLUSTER_SPEC_SCHEMA,
            },
        },
    },
}


# --------------------------------------------------------------------------------------------
# Loading and dispatch
# --------------------------------------------------------------------------------------------

def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read one YAML document; a file that is not a YAML mapping raises ConfigValidationError."""
    text = Path(path).read_text()
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigValidationError(str(path), [f"not valid YAML: {exc}"]) from None
    if not isinstance(doc, dict):
        raise ConfigValidationError(str(path), ["expected a YAML mapping at the top level"])
    return doc


def detect_kind(doc: dict[str, Any]) -> str:
    """RayCluster / RayJob manifests by their ``kind``; launcher configs by ``provider``."""
    if "apiVersion" in doc or "kind" in doc:
        return str(doc.get("kind"))
    if "provider" in doc and "cluster_name" in doc:
        return KIND_LAUNCHER
    raise ValueError(
        "cannot tell what this config is: a Ray launcher config has `cluster_name` and "
        "`provider`, a KubeRay manifest has `apiVersion: ray.io/v1` and `kind`"
    )


def _schema_problems(doc: Any, schema: dict[str, Any], label: str) -> list[str]:
    import jsonschema

    validator_cls = jsonschema.validators.validator_for(schema)
    errors = sorted(validator_cls(schema).iter_errors(doc), key=lambda e: list(e.absolute_path))
    return [f"{label}: at {_json_path(e.absolute_path)}: {e.message}" for e in errors]


def _json_path(parts: Iterable[Any]) -> str:
    out = "$"
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def ray_schema_path() -> Path:
    """The cluster-config JSON schema inside the installed ray package."""
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: the installed ray has no cluster-config schema; "
            "reinstall ray[default] at the version pinned in setup.py"
        )
    return path


# --------------------------------------------------------------------------------------------
# Ray cluster launcher
# --------------------------------------------------------------------------------------------

def validate_launcher_config(doc: dict[str, Any]) -> ValidationReport:
    """Check a cluster-launcher config the way ``ray up`` would, offline, plus project rules."""
    report = ValidationReport(path="<config>", kind=KIND_LAUNCHER)

    schema = json.loads(ray_schema_path().read_text())
    report.checks.append("ray-schema.json (as written)")
    report.problems += _schema_problems(doc, schema, "ray-schema.json")

    if not report.problems:
        # Ray's own path: merge the provider's defaults.yaml, then validate_config (the schema
        # again plus cross-field rules: head_node_type exists, sum(min_workers) <= max_workers).
        from ray.autoscaler._private.util import prepare_config, validate_config

        report.checks.append("ray prepare_config + validate_config")
        try:
            validate_config(prepare_config(copy.deepcopy(doc)))
        except Exception as exc:  # jsonschema.ValidationError, ValueError, RuntimeError
            report.problems.append(f"ray validate_config: {type(exc).__name__}: {exc}")

    report.checks.append("project rules")
    report.problems += check_project_rules(doc, KIND_LAUNCHER)
    return report


def _launcher_gpu_workers(doc: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(node type, min_workers, max_workers) for each worker type that offers a GPU."""
    head = doc.get("head_node_type")
    out = []
    for name, node_type in (doc.get("available_node_types") or {}).items():
        if name == head:
            continue
        if int((node_type.get("resources") or {}).get("GPU", 0)) > 0:
            out.append((name, int(node_type.get("min_workers", 0)),
                        int(node_type.get("max_workers", doc.get("max_workers", 0)))))
    return out


def _launcher_rules(doc: dict[str, Any]) -> list[str]:
    problems = []
    gpu_types = _launcher_gpu_workers(doc)
    if not gpu_types:
        problems.append("no worker node type declares resources.GPU > 0; the search and "
                        "retrain stages need GPU workers")
    min_gpu_workers = sum(t[1] for t in gpu_types)
    max_gpu_workers = sum(t[2] for t in gpu_types)
    if gpu_types and min_gpu_workers < SEARCH_GPU_WORKERS:
        problems.append(f"GPU workers min_workers sum to {min_gpu_workers}; the search needs "
                        f"{SEARCH_GPU_WORKERS}: raise min_workers")
    if gpu_types and max_gpu_workers < RETRAIN_GPU_WORKERS:
        problems.append(f"GPU workers max_workers sum to {max_gpu_workers}; the retrain needs "
                        f"{RETRAIN_GPU_WORKERS}: raise max_workers")
    if int(doc.get("max_workers", 0)) < RETRAIN_GPU_WORKERS:
        problems.append(f"top-level max_workers is {doc.get('max_workers')}; it caps the "
                        f"cluster below the {RETRAIN_GPU_WORKERS} retrain workers")
    head = (doc.get("available_node_types") or {}).get(doc.get("head_node_type"), {})
    if int((head.get("resources") or {}).get("GPU", 0)) > 0:
        problems.append("the head node type offers GPUs; keep it a CPU node (resources.GPU: 0)")
    start = " ".join(doc.get("head_start_ray_commands", []) + doc.get("worker_start_ray_commands", []))
    run_opts = " ".join((doc.get("docker") or {}).get("run_options", []))
    if "RAY_AUTH_MODE=token" not in start + " " + run_opts:
        problems.append("Ray token authentication is not set explicitly: put RAY_AUTH_MODE=token "
                        "in the start commands (or docker run_options) so every node agrees")
    return problems


# --------------------------------------------------------------------------------------------
# KubeRay
# --------------------------------------------------------------------------------------------

def validate_kuberay_manifest(doc: dict[str, Any]) -> ValidationReport:
    """Structural check of a RayCluster or RayJob manifest, plus project rules."""
    kind = doc.get("kind")
    if kind not in (KIND_RAYCLUSTER, KIND_RAYJOB):
        report = ValidationReport(path="<manifest>", kind=str(kind))
        report.problems.append(f"kind is {kind!r}; expected {KIND_RAYCLUSTER!r} or {KIND_RAYJOB!r}")
        return report
    report = ValidationReport(path="<manifest>", kind=kind)
    schema = RAYCLUSTER_SCHEMA if kind == KIND_RAYCLUSTER else RAYJOB_SCHEMA
    report.checks.append(f"structural {kind} schema (cluster/validate.py)")
    report.problems += _schema_problems(doc, schema, f"{kind} schema")
    if not report.problems:
        report.checks.append("project rules")
        report.problems += check_project_rules(doc, kind)
    return report


def _cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc.get("spec") or {}
    return spec.get("rayClusterSpec", {}) if doc.get("kind") == KIND_RAYJOB else spec


def _container_gpus(container: dict[str, Any]) -> int:
    resources = container.get("resources") or {}
    limits = resources.get("limits") or {}
    requests = resources.get("requests") or {}
    return int(limits.get("nvidia.com/gpu", requests.get("nvidia.com/gpu", 0)))


def _container_has_token_env(container: dict[str, Any]) -> bool:
    names = {e.get("name"): e for e in container.get("env") or []}
    mode = names.get("RAY_AUTH_MODE", {}).get("value")
    token = names.get("RAY_AUTH_TOKEN", {})
    return mode == "token" and "valueFrom" in token


def _kuberay_rules(doc: dict[str, Any]) -> list[str]:
    problems = []
    spec = _cluster_spec(doc)
    head_containers = spec["headGroupSpec"]["template"]["spec"]["containers"]
    if any(_container_gpus(c) > 0 for c in head_containers):
        problems.append("the head pod requests nvidia.com/gpu; keep the head a CPU pod")
    gpu_groups = []
    for group in spec["workerGroupSpecs"]:
        containers = group["template"]["spec"]["containers"]
        gpus = max(_container_gpus(c) for c in containers)
        if gpus > 0:
            gpu_groups.append(group)
        res = containers[0].get("resources") or {}
        req, lim = (res.get("requests") or {}), (res.get("limits") or {})
        if "nvidia.com/gpu" in req and "nvidia.com/gpu" in lim and req["nvidia.com/gpu"] != lim["nvidia.com/gpu"]:
            problems.append(f"worker group {group['groupName']!r}: nvidia.com/gpu requests and "
                            "limits differ; Kubernetes requires them equal for extended resources")
        lo, hi = group.get("minReplicas", 0), group.get("maxReplicas", group.get("replicas", 0))
        if not lo <= group.get("replicas", lo) <= hi:
            problems.append(f"worker group {group['groupName']!r}: replicas must lie in "
                            f"[minReplicas, maxReplicas] = [{lo}, {hi}]")
    if not gpu_groups:
        problems.append("no worker group requests nvidia.com/gpu in resources.limits; the search "
                        "and retrain stages need GPU workers")
    else:
        start = sum(g.get("replicas", g.get("minReplicas", 0)) for g in gpu_groups)
        most = sum(g.get("maxReplicas", g.get("replicas", 0)) for g in gpu_groups)
        if start < SEARCH_GPU_WORKERS:
            problems.append(f"GPU worker groups start with {start} replicas; the search needs "
                            f"{SEARCH_GPU_WORKERS}")
        if most < RETRAIN_GPU_WORKERS:
            problems.append(f"GPU worker groups can grow to {most} replicas; the retrain needs "
                            f"{RETRAIN_GPU_WORKERS}: raise maxReplicas")
        if most > start and not spec.get("enableInTreeAutoscaling"):
            problems.append("maxReplicas > replicas but enableInTreeAutoscaling is not true: "
                            "nothing would ever add the retrain workers")
    # Token auth: either KubeRay's authOptions (>= 1.5.1) or the env vars on every container.
    if (spec.get("authOptions") or {}).get("mode") != "token":
        all_containers = head_containers + [
            c for g in spec["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]]
        if not all(_container_has_token_env(c) for c in all_containers):
            problems.append("Ray token authentication is not enabled: set spec authOptions.mode: "
                            "token (KubeRay >= 1.5.1) or RAY_AUTH_MODE=token plus RAY_AUTH_TOKEN "
                            "from a Secret (valueFrom.secretKeyRef) on every Ray container")
    if doc.get("kind") == KIND_RAYJOB:
        entry = doc["spec"]["entrypoint"]
        if not re.search(r"\bpipeline/run\.py\b.*--config\s+\S+", entry):
            problems.append(f"entrypoint {entry!r} does not run pipeline/run.py --config FILE")
        if doc["spec"]["shutdownAfterJobFinishes"] is not True:
            problems.append("shutdownAfterJobFinishes is false: the GPU cluster would keep "
                            "running (and billing) after the job ends")
        runtime_env = doc["spec"].get("runtimeEnvYAML")
        if runtime_env is not None:
            try:
                parsed = yaml.safe_load(runtime_env)
            except yaml.YAMLError as exc:
                problems.append(f"runtimeEnvYAML is not valid YAML: {exc}")
            else:
                if not isinstance(parsed, dict):
                    problems.append("runtimeEnvYAML must be a mapping (working_dir, env_vars, ...)")
    return problems


# --------------------------------------------------------------------------------------------
# Credentials and project rules
# --------------------------------------------------------------------------------------------

# Variable names whose *values* must never be written into a config file.
SECRET_ENV_NAMES = frozenset({
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "RAY_AUTH_TOKEN",
})
_SECRET_KEY_PATTERN = re.compile(r"(secret|password|passwd|token|access_?key)", re.I)
_AWS_KEY_ID_PATTERN = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
_ENV_ASSIGN_PATTERN = re.compile(r"\b(" + "|".join(sorted(SECRET_ENV_NAMES)) + r")=(?!\$)(\S+)")


def find_embedded_credentials(doc: Any) -> list[str]:
    """Places where a config writes a credential value instead of taking it from outside.

    Flags: AWS access key ids anywhere; ``KEY=value`` shell assignments of secret variables in
    commands; env entries ``{name: SECRET, value: literal}``; mapping keys that look like
    secrets with a literal non-empty value (``secretKeyRef`` / ``secretName`` references and
    the token *mode* are fine).
    """
    found: list[str] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if node.get("name") in SECRET_ENV_NAMES and isinstance(node.get("value"), str):
                found.append(f"{where}: env {node['name']} has a literal value; take it from a "
                             "Secret (valueFrom.secretKeyRef / envFrom) instead")
            for key, value in node.items():
                here = f"{where}.{key}"
                if (isinstance(key, str) and _SECRET_KEY_PATTERN.search(key)
                        and key not in ("secretKeyRef", "secretRef", "secretName", "authOptions")
                        and isinstance(value, (str, int)) and str(value).strip()
                        and not str(value).startswith(("$", "~", "/", "./"))):
                    # A "$VAR" reference or a path to a token file is not itself a credential.
                    found.append(f"{here}: looks like a credential written into the file")
                walk(value, here)
        elif isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{where}[{i}]")
        elif isinstance(node, str):
            if _AWS_KEY_ID_PATTERN.search(node):
                found.append(f"{where}: contains an AWS access key id")
            for match in _ENV_ASSIGN_PATTERN.finditer(node):
                found.append(f"{where}: assigns {match.group(1)} a literal value; read it from "
                             "the environment instead")

    walk(doc, "$")
    return found


def check_project_rules(doc: dict[str, Any], kind: str) -> list[str]:
    """Sizing, auth and credential rules of this project (beyond what the schemas say)."""
    problems = find_embedded_credentials(doc)
    if kind == KIND_LAUNCHER:
        problems += _launcher_rules(doc)
    elif kind in (KIND_RAYCLUSTER, KIND_RAYJOB):
        problems += _kuberay_rules(doc)
    return problems


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------

def validate_config_doc(doc: dict[str, Any], path: str = "<config>") -> ValidationReport:
    """Validate one parsed config of any supported kind; never raises for a bad config."""
    try:
        kind = detect_kind(doc)
    except ValueError as exc:
        return ValidationReport(path=path, kind="unknown", problems=[str(exc)])
    if kind == KIND_LAUNCHER:
        report = validate_launcher_config(doc)
    else:
        report = validate_kuberay_manifest(doc)
    report.path = path
    return report


def validate_file(path: str | os.PathLike) -> ValidationReport:
    """Validate one YAML file; returns the report (``.raise_if_failed()`` to raise)."""
    try:
        doc = load_config(path)
    except ConfigValidationError as exc:
        return ValidationReport(path=str(path), kind="unknown", problems=exc.problems)
    return validate_config_doc(doc, str(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.validate",
        description="Validate Ray cluster-launcher configs (against Ray's ray-schema.json) and "
                    "KubeRay RayCluster/RayJob manifests (structural schema).")
    parser.add_argument("files", nargs="+", help="YAML files to check")
    args = parser.parse_args(argv)

    failed = 0
    for path in args.files:
        report = validate_file(path)
        if report.ok:
            print(f"OK    {path} ({report.kind}; checked: {', '.join(report.checks)})")
        else:
            failed += 1
            print(f"FAIL  {path} ({report.kind})")
            for problem in report.problems:
                print(f"        - {problem}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
