"""The pipeline's config: one YAML validated into typed pydantic models, with named errors.

Each layer owns the section it consumes; this module composes them into ``PipelineConfig``::

    name, seed, space          the experiment, its seed, the search space (preset / YAML path / dict)
    data                       the split stage          jobs.split.SplitConfig
    profile                    the profile stage        jobs.profile.ProfileConfig
    search                     the search stage         jobs.search.SearchJobConfig (SearchConfig + Train resources)
    derive                     the derive stage         jobs.derive.DeriveConfig
    retrain                    the retrain stage        jobs.retrain.RetrainConfig
    sweep                      the sweep stage          jobs.sweep.SweepConfig
    storage {uri}              artifact store: s3://bucket/prefix, file:///path or a plain path
    tracking {uri, experiment} MLflow
    ray {address, ...}         where the job runs

Each section is written in YAML exactly as its model's fields. Errors (``ConfigError``) name the key path and the rule: an unknown key names the nearest
valid one (``search.lamda: unknown key; did you mean 'lambda'?``).
"""
from __future__ import annotations

import copy
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cluster.storage import default_store_uri
from jobs.context import LOCAL_STORE, REPO_ROOT, resolve_space
from jobs.derive import DeriveConfig
from jobs.profile import ProfileConfig
from jobs.retrain import RetrainConfig
from jobs.search import SearchJobConfig
from jobs.split import SplitConfig
from jobs.sweep import SweepConfig

# search.cost: the MACs proxy, the profile stage's latency table, or a table JSON path.
COST_SOURCES = ("macs", "profile")

__all__ = [
    "ConfigError", "PipelineConfig", "load_config", "parse_config", "apply_overrides", "preflight",
    "default_tracking_uri", "resolve_space", "REPO_ROOT", "LOCAL_STORE",
]


class ConfigError(ValueError):
    """A config problem, with the key path that caused it and what to do."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


# --------------------------------------------------------------------------- sections owned here


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else a SQLite file beside the repo (MLflow 3.17 refuses the file store)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO_ROOT / 'mlflow.db'}"


class StorageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    uri: str | None = Field(None, description="s3://bucket/prefix, file:///path or a path; None: $DENSENAS_STORE "
                                              "or <repo>/runs-store")


class TrackingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    uri: str | None = Field(None, description="MLflow tracking URI; None: $MLFLOW_TRACKING_URI or sqlite")
    experiment: str | None = Field(None, description="MLflow experiment; None: the config's name")
    enabled: bool = True


class RayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    address: str | None = Field(None, description="'auto', ray://host:port, or None: the job's cluster "
                                                  "($RAY_ADDRESS) when there is one, else a local Ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray (None: all)")
    num_gpus: int | None = Field(None, ge=0)
    init_timeout_s: float = Field(10, gt=0, description="how long a given Ray address may take to answer before "
                                                        "the run fails (checked before any work)")


class PipelineConfig(BaseModel):
    """The whole experiment. Stage sections are the owning layers' models."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                      description="experiment name; also the default run id")
    seed: int = 0
    space: str | dict[str, Any] = Field("tiny_mbconv", description="preset name, YAML path or inline dict")
    data: SplitConfig = Field(default_factory=SplitConfig)
    profile: ProfileConfig = Field(default_factory=ProfileConfig)
    search: SearchJobConfig = Field(default_factory=SearchJobConfig)
    derive: DeriveConfig = Field(default_factory=DeriveConfig)
    retrain: RetrainConfig = Field(default_factory=RetrainConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    def section(self, name: str) -> Any:
        """A top-level section by its YAML name (``space`` stays what the YAML gave)."""
        if name not in type(self).model_fields:
            raise KeyError(f"no config section {name!r}; sections: {', '.join(type(self).model_fields)}")
        return getattr(self, name)

    def resolved(self) -> "PipelineConfig":
        """A copy with the environment-dependent defaults filled in (store, tracking, experiment)."""
        return self.model_copy(update={
            "storage": self.storage.model_copy(update={"uri": self.storage.uri or default_store_uri(LOCAL_STORE)}),
            "tracking": self.tracking.model_copy(update={
                "uri": self.tracking.uri or default_tracking_uri(),
                "experiment": self.tracking.experiment or self.name}),
        })

    def dump(self) -> dict[str, Any]:
        """The YAML/JSON form (aliases as in YAML, e.g. ``search.lambda``)."""
        return self.model_dump(mode="json", by_alias=True)


# --------------------------------------------------------------------------- unknown keys, with suggestions
def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (``Model``, ``Model | None``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        if len(models) == 1:
            return models[0]
    return None


def _known_keys(model: type[BaseModel]) -> dict[str, Any]:
    """YAML key -> field annotation, aliases included (``lambda`` for ``lambda_``)."""
    keys: dict[str, Any] = {}
    populate_by_name = bool(model.model_config.get("populate_by_name"))
    for name, field in model.model_fields.items():
        va = field.validation_alias
        if va is not None:      # str or AliasChoices (e.g. profile.actors, also spelled workers)
            choices = [va] if isinstance(va, str) else [c for c in getattr(va, "choices", []) if isinstance(c, str)]
            for c in choices:
                keys[c] = field.annotation
            if populate_by_name or not choices:
                keys[name] = field.annotation
            continue
        if field.alias:
            keys[field.alias] = field.annotation
            if populate_by_name:
                keys[name] = field.annotation
        else:
            keys[name] = field.annotation
    return keys


def check_keys(model: type[BaseModel], data: Any, path: str = "") -> None:
    """Raise ``ConfigError`` for the first unknown key, naming its path and the nearest valid key."""
    if not isinstance(data, Mapping):
        return
    known = _known_keys(model)
    for key in data:
        where = f"{path}.{key}" if path else str(key)
        if key not in known:
            visible = [k for k in known if not (k.endswith("_") and k[:-1] in known)]
            near = difflib.get_close_matches(str(key), visible, n=1, cutoff=0.5)
            hint = f"did you mean {near[0]!r}?" if near else f"valid keys: {', '.join(sorted(visible))}"
            raise ConfigError(where, f"unknown key; {hint}")
        sub = _model_in(known[key])
        if sub is not None:
            check_keys(sub, data[key], where)


def _loc_path(model: type[BaseModel], loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc if not (isinstance(p, str) and "[" in p)]  # drop union tags
    return ".".join(p if not p.isdigit() else f"[{p}]" for p in parts).replace(".[", "[")


def _format_validation(err: ValidationError, model: type[BaseModel]) -> ConfigError:
    e = err.errors()[0]
    path = _loc_path(model, e["loc"])
    msg = e["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    got = e.get("input")
    extra = f" (got {got!r})" if not isinstance(got, (dict, list)) and e["type"] != "missing" else ""
    more = len(err.errors()) - 1
    return ConfigError(path, f"{msg}{extra}" + (f"; and {more} more error(s)" if more else ""))


# --------------------------------------------------------------------------- --set overrides
def apply_overrides(doc: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """``["search.lambda=0.3", "data.classes=[a, b]"]`` applied to a copy of ``doc``; values are YAML."""
    out = copy.deepcopy(doc)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "--set expects key=value (e.g. --set search.lambda=0.3)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(key or item, "--set key must be a dotted path like search.lambda")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(key, f"--set value {raw!r} is not valid YAML: {e}") from None
        node = out
        parts = key.split(".")
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(".".join(parts[: i + 1]), f"is a {type(nxt).__name__}, not a section; "
                                                            f"cannot set {key}")
            node = nxt
        node[parts[-1]] = value
    return out


# --------------------------------------------------------------------------- loading and preflight
def parse_config(doc: Mapping[str, Any], overrides: Iterable[str] = ()) -> PipelineConfig:
    """Validate a config dict (after ``--set`` overrides); errors are ``ConfigError``."""
    if not isinstance(doc, Mapping):
        raise ConfigError("<config>", f"must be a mapping of sections, got {type(doc).__name__}")
    check_expansion(doc)
    doc = apply_overrides(dict(doc), overrides)
    check_expansion(doc)
    check_keys(PipelineConfig, doc)
    try:
        return PipelineConfig.model_validate(doc)
    except ValidationError as err:
        raise _format_validation(err, PipelineConfig) from None


MAX_CONFIG_BYTES = 1 << 20        # a config is a few KB; a bigger file is a mistake (or an attack)
MAX_CONFIG_VALUES = 100_000       # values after expanding YAML aliases (a 600-byte "billion laughs" gives 10^9)


def _expanded_size(doc: Any, limit: int) -> int:
    """How many values ``doc`` holds with every alias expanded, counted without expanding (shared
    nodes are counted by reference); stops at ``limit`` + 1. A cycle (``&a [*a]``) counts as over."""
    memo: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Any) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        key = id(node)
        if key in memo:
            return memo[key]
        if key in active:
            return limit + 1
        active.add(key)
        total = 1
        items = list(node.keys()) + list(node.values()) if isinstance(node, dict) else node
        for item in items:
            total += size(item)
            if total > limit:
                break
        active.discard(key)
        memo[key] = total = min(total, limit + 1)
        return total

    return size(doc)


def check_expansion(doc: Any, where: str = "<config>") -> None:
    """``ConfigError`` when a YAML document expands (through aliases) beyond ``MAX_CONFIG_VALUES`` values."""
    if _expanded_size(doc, MAX_CONFIG_VALUES) > MAX_CONFIG_VALUES:
        raise ConfigError(where, f"expands to more than {MAX_CONFIG_VALUES:,} values through YAML anchors/aliases "
                                 "(or refers to itself); write the values out instead of nesting aliases")


def read_config_file(path: str | Path) -> Any:
    """The YAML document of a config file, with one-line ``ConfigError``s for every way reading it fails."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(str(path), "config file does not exist (try configs/tiny.yaml)")
    if p.is_dir():
        raise ConfigError(str(path), "is a directory; give a YAML file such as configs/tiny.yaml")
    try:
        size = p.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(str(path), f"is {size:,} bytes; a config is at most {MAX_CONFIG_BYTES:,} bytes "
                                         "(did you pass a data file?)")
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(str(path), f"cannot be read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(str(path), f"is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r}); save it as "
                                     "UTF-8 YAML") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        first = " ".join(str(e).split())
        raise ConfigError(str(path), f"not valid YAML: {first}") from None
    check_expansion(doc, str(path))
    return {} if doc is None else doc


def load_config(path: str | Path, overrides: Iterable[str] = (), check: bool = True) -> PipelineConfig:
    """Read, override, validate and (``check=True``) preflight a config YAML."""
    cfg = parse_config(read_config_file(path), overrides)
    if check:
        preflight(cfg)
    return cfg


def preflight(cfg: PipelineConfig) -> None:
    """Checks that need more than types, done before any work starts: the space builds, the dataset
    root exists, the cost table exists, the space and the data agree."""
    from densenas.space import SpaceError

    try:
        space = resolve_space(cfg.space)
    except SpaceError as e:
        raise ConfigError("space", str(e)) from None

    root = getattr(cfg.data, "root", None)
    if getattr(cfg.data, "source", None) == "folder" and isinstance(root, str) and "://" not in root:
        if not (Path(root).expanduser() / "train").is_dir():
            raise ConfigError("data.root", f"dataset root {root!r} has no train/ directory (or does not exist); "
                                           "give an image-folder tree ROOT/train/<class>/*.jpg, or use "
                                           "data.source: embedded")
    image_size = getattr(cfg.data, "image_size", None)
    if isinstance(image_size, int) and image_size < space.input_size:
        raise ConfigError("data.image_size", f"{image_size} is smaller than the space's input_size "
                                             f"{space.input_size} ({space.name}); raise data.image_size or "
                                             "use a space built for this resolution")
    cost = cfg.search.cost
    if cost not in COST_SOURCES and "://" not in cost and not Path(cost).exists():
        raise ConfigError("search.cost", f"{cost!r} is neither one of {COST_SOURCES} nor an existing "
                                         "latency-table JSON; use 'profile' for the profile stage's table")
