"""Config loading: typed sections, named errors (unknown keys with suggestions, bad values), --set, preflight."""
import pytest

from pipeline.config import ConfigError, PipelineConfig, apply_overrides, load_config, parse_config
from pipeline.run import main as run_main

BASE = {"name": "t", "space": "micro_mbconv", "tracking": {"enabled": False}}


def _err(doc=None, overrides=(), check=True):
    with pytest.raises(ConfigError) as ei:
        cfg = parse_config(doc or BASE, overrides)
        if check:
            from pipeline.config import preflight
            preflight(cfg)
    return str(ei.value)


def test_shipped_configs_validate():
    tiny = load_config("configs/tiny.yaml")
    assert tiny.name == "tiny" and tiny.search.lambda_ == 0.15 and tiny.search.workers == 2 and tiny.data.max_per_class == 200
    assert type(tiny.data).__module__ == "jobs.split"          # the owning layer's model, not a copy
    big = load_config("configs/imagenet_mbconv.yaml", check=False)
    assert big.search.epochs == 250 and big.search.warmup_epochs == 150 and big.data.classes == 100


def test_unknown_key_names_path_and_nearest_key():
    assert _err(BASE, ["search.lamda=0.3"]) == "search.lamda: unknown key; did you mean 'lambda'?"
    assert "did you mean 'search'" in _err({**BASE, "serach": {}})
    assert _err(BASE, ["search.weights.momentun=0.5"]).startswith("search.weights.momentun: unknown key; did you mean 'momentum'")
    assert _err(BASE, ["search.worker=1"]) == "search.worker: unknown key; did you mean 'workers'?"   # job field
    msg = _err(BASE, ["storage.zzz=1"])
    assert msg.startswith("storage.zzz: unknown key; valid keys: uri")


def test_bad_values_name_field_and_rule():
    assert _err(BASE, ["search.lambda=-0.1"]) == "search.lambda: Input should be greater than or equal to 0 (got -0.1)"
    assert _err(BASE, ["search.tau=1"]).startswith("search.tau: Input should be greater than 1")
    assert "warmup_epochs (9) exceeds epochs (3)" in _err(BASE, ["search.epochs=3", "search.warmup_epochs=9"])
    assert _err(BASE, ["search.workers=0"]) == "search.workers: Input should be greater than or equal to 1 (got 0)"
    assert _err(BASE, ["seed=abc"]).startswith("seed: Input should be a valid integer")
    assert _err(BASE, ["data.source=ftp"]).startswith("data.source: Input should be 'embedded', 'folder' or 'shards'")


def test_set_overrides_parse_yaml_values():
    cfg = parse_config(BASE, ["search.lambda=0.3", "data.classes=[coat, bag]", "search.arch.betas=[0.1, 0.2]",
                              "ray.num_cpus=2", "sweep.enabled=true"])
    assert cfg.search.lambda_ == 0.3 and cfg.data.classes == ["coat", "bag"]
    assert cfg.search.arch.betas == (0.1, 0.2) and cfg.ray.num_cpus == 2 and cfg.sweep.enabled is True
    assert apply_overrides({"a": {"b": 1}}, ["a.c=x y"]) == {"a": {"b": 1, "c": "x y"}}
    assert "expects key=value" in _err(BASE, ["search.lambda"])
    assert _err(BASE, ["name.x=1"]).startswith("name: is a str, not a section")


def test_preflight_space_dataset_root_and_cost(tmp_path):
    bad_space = {"input_size": 32, "in_channels": 1, "stem": {"op": "conv3x3", "out": 8, "stride": 2},
                 "widths": [16, 8], "resolutions": [8, 8], "stage_ids": [1, 2], "stacking_layers": [0, 0],
                 "connections_m": 2, "stacking_ops": ["mbconv_k3_e3"], "head_ops": ["mbconv_k3_e3"]}
    msg = _err({**BASE, "space": bad_space})
    assert msg.startswith("space: ") and "widths" in msg
    msg = _err(BASE, ["data.source=folder", f"data.root={tmp_path / 'nowhere'}"])
    assert msg.startswith("data.root: dataset root") and "nowhere" in msg
    assert _err(BASE, ["search.cost=/no/table.json"]).startswith("search.cost: '/no/table.json' is neither")


def test_resolved_defaults_follow_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DENSENAS_STORE", str(tmp_path / "s"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = parse_config(BASE).resolved()
    assert cfg.storage.uri == str(tmp_path / "s")
    assert cfg.tracking.uri.startswith("sqlite:///") and cfg.tracking.experiment == "t"
    dumped = cfg.dump()
    assert dumped["search"]["lambda"] == 0.15 and PipelineConfig.model_validate(dumped) == cfg


def test_entry_point_fails_before_work_with_named_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DENSENAS_STORE", str(tmp_path / "store"))
    rc = run_main(["--config", "configs/tiny.yaml", "--set", "search.lamda=0.3"])
    assert rc == 2
    assert "search.lamda: unknown key; did you mean 'lambda'?" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()          # nothing was written: no work started
    assert run_main(["--config", "configs/tiny.yaml", "--set", "search.lambda=-1"]) == 2
    assert "search.lambda: Input should be greater than or equal to 0" in capsys.readouterr().err
