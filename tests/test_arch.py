"""densenas.arch: the published networks rebuild to their counts; JSON / authors' string / model round trips;
bad documents get named errors. Each 224x224 model is built once; forwards run at 32x32 only."""
import json
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

from densenas.arch import (Arch, ArchError, DenseNASNet, arch_from_derivation, build_model, list_presets, load_arch,
                           main, make_presets, presets_dir)
from densenas.counting import count_macs, count_params
from densenas.space import load_space

REFERENCE = Path("/work/shared/reference/published_archs.yaml")  # the team's reference; may be absent in CI
PUBLISHED = ["densenas_a_cvpr2020", "densenas_b_cvpr2020", "densenas_c_cvpr2020", "densenas_c_arxiv2019",
             "mobilenet_v2_1_0"]
CVPR2020 = PUBLISHED[:3]


def _reference() -> dict:
    """The reference's entries, or the copies of them kept in the presets' metadata when it is absent."""
    if REFERENCE.exists():
        return yaml.safe_load(REFERENCE.read_text())
    out = {}
    for name in PUBLISHED:
        meta = load_arch(name).metadata
        out[name] = {k: meta[k] for k in ("paper", "recount", "note") if k in meta}
        if "official_last_conv_channels" in meta:
            out[name]["last_conv_channels"] = meta["official_last_conv_channels"]
        if name != "mobilenet_v2_1_0":
            out[name]["official"] = meta["official"]
    return out


@pytest.fixture(scope="module")
def reference():
    return _reference()


@pytest.fixture(scope="module")
def built():
    """name -> (arch, model, params, MACs at 224), each model built once."""
    torch.manual_seed(0)
    out = {}
    for name in PUBLISHED:
        arch = load_arch(name)
        model = build_model(arch)
        out[name] = (arch, model, count_params(model), count_macs(model, 224))
    return out


def test_presets_are_exactly_the_published_names():
    assert list_presets() == sorted(PUBLISHED)


@pytest.mark.parametrize("name", PUBLISHED[:4])
def test_published_net_rebuilds_to_its_recount(name, built, reference):
    _, _, params, macs = built[name]
    recount = reference[name]["recount"]
    assert params / 1e6 == pytest.approx(recount["params_m"], rel=0.005)
    assert macs / 1e6 == pytest.approx(recount["macs_m"], rel=0.005)


def test_mobilenet_v2_preset_counts_like_torchvision(built):
    _, model, params, macs = built["mobilenet_v2_1_0"]
    tv = torchvision.models.mobilenet_v2()
    assert params == count_params(tv) == 3_504_872
    assert macs == count_macs(tv, 224)
    assert abs(macs / 1e6 - 300.8) < 0.1
    # Same layer shapes in the same order (names differ), not just the same totals.
    ours = [tuple(p.shape) for p in model.parameters()]
    theirs = [tuple(p.shape) for p in tv.parameters()]
    assert ours == theirs


@pytest.mark.parametrize("name", CVPR2020 + ["densenas_c_arxiv2019"])
def test_authors_string_gives_the_preset_and_the_same_model(name, built, reference):
    entry = reference[name]
    from_string = Arch.from_official(entry["official"], last_conv_channels=entry.get("last_conv_channels"))
    arch, model, params, macs = built[name]
    assert from_string == arch
    rebuilt = build_model(from_string)
    assert count_params(rebuilt) == params and count_macs(rebuilt, 224) == macs
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", PUBLISHED)
def test_json_official_and_model_round_trips(name, built):
    arch, model, _, _ = built[name]
    again = Arch.from_json(arch.to_json())
    assert again == arch and again.metadata == arch.metadata
    assert Arch.from_json(arch.to_json(indent=None)) == arch
    assert Arch.from_official(arch.to_official()) == arch
    assert model.arch == arch and Arch.from_model(model) == arch
    # The official string survives a second trip unchanged.
    assert Arch.from_official(arch.to_official()).to_official() == arch.to_official()


def test_official_strings_use_the_authors_spelling(reference):
    arch = load_arch("densenas_c_cvpr2020")
    assert arch.to_official() == reference["densenas_c_cvpr2020"]["official"].replace("| ", "|").replace(" |", "|")
    assert "'conv1_1'" in arch.to_official() and "_e" not in arch.to_official()


def test_presets_are_generated_from_the_reference(tmp_path):
    if not REFERENCE.exists():
        pytest.skip(f"{REFERENCE} not present")
    make_presets(REFERENCE, tmp_path)
    for name in PUBLISHED:
        assert (tmp_path / f"{name}.json").read_text() == (presets_dir() / f"{name}.json").read_text(), \
            f"densenas/presets/{name}.json is stale: run python -m densenas.arch make-presets {REFERENCE}"


def test_one_line_form():
    line = load_arch("densenas_a_cvpr2020").one_line()
    assert line == ("16-k3e1 | 24:s2 k3e3 | 48:s2 k7e6 k7e3 | 72:s2 k5e6 k3e3 k5e3 | 128:k3e3 k3e3 | "
                    "176:s2 k3e3 k3e6 k3e3 k3e6 | 384:k5e6 | 1984")
    assert load_arch("mobilenet_v2_1_0").one_line().startswith("32 | 16:k3e1 | 24:s2 k3e6 k3e6 |")
    assert load_arch("densenas_c_arxiv2019").one_line().endswith("| 480:k3e3 | 1728")


def test_load_arch_accepts_every_source(tmp_path):
    arch = load_arch("densenas_b_cvpr2020")
    path = tmp_path / "b.json"
    path.write_text(arch.to_json())
    for source in (arch, arch.to_dict(), arch.to_json(), path, str(path), arch.to_official()):
        assert load_arch(source) == arch
    with pytest.raises(ArchError, match="preset"):
        load_arch("densenas_z")


def test_small_forward_and_num_classes_override():
    model = build_model("densenas_a_cvpr2020", num_classes=10)
    assert model.arch.num_classes == 10 and model.classifier.out_features == 10
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert Arch.from_model(model).num_classes == 10


def test_meta_device_build_for_counting():
    with torch.device("meta"):
        model = build_model("densenas_c_cvpr2020")
    assert next(model.parameters()).is_meta
    assert count_macs(model, 224) / 1e6 == pytest.approx(360.81, rel=0.005)


def test_arch_from_a_search_space_path():
    space = load_space("tiny_mbconv")
    path = next(p for p in space.paths() if len(p) >= 3)
    heads = [space.head_ops[0]] * (len(path) - 1)
    stacks = [[space.stacking_ops[1]] * space.blocks[j].n_stacking for j in path[1:]]
    arch = Arch.from_path(space, path, heads, stacks, num_classes=10)
    assert arch.stem.out == space.stem.out and arch.in_channels == 1 and arch.input_size == 32
    assert arch.blocks[0].head_op == space.first_layer.op  # the fixed first layer
    assert [b.c_out for b in arch.blocks[1:]] == [space.blocks[j].width for j in path[1:]]
    assert arch.last_conv.out == space.last_conv_channels
    assert arch.metadata["space_hash"] == space.space_hash()
    # Skip stacking layers are removed from the derived network.
    skipped = Arch.from_path(space, path, heads, [["skip"] * len(s) for s in stacks], num_classes=10)
    assert all(not b.stacking_ops for b in skipped.blocks)
    model = build_model(arch)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 10)
    same = arch_from_derivation(space, [{"c_in": b.c_in, "c_out": b.c_out, "stride": b.stride, "head": b.head_op,
                                         "stack": list(b.stacking_ops)} for b in arch.blocks[1:]], num_classes=10)
    assert same == arch


def _doc(**changes):
    d = load_arch("densenas_a_cvpr2020").to_dict()
    for key, value in changes.items():
        target, *path = key.split(".")
        if not path:
            if value is KeyError:
                del d[target]
            else:
                d[target] = value
            continue
        obj = d[target]
        for p in path[:-1]:
            obj = obj[int(p)] if p.isdigit() else obj[p]
        obj[path[-1]] = value
    return d


@pytest.mark.parametrize("changes, field", [
    ({"format": "densenas-space"}, "format"),
    ({"version": 2}, "version"),
    ({"blocks": KeyError}, "blocks"),
    ({"extra": 1}, "extra"),
    ({"blocks.2.in": 32}, "blocks[2].in"),
    ({"blocks.2.stacking_ops": ["mbconv_k9_e6"]}, "blocks[2].stacking_ops[0]"),
    ({"blocks.1.stride": 3}, "blocks[1].stride"),
    ({"blocks.1.out": -24}, "blocks[1].out"),
    ({"blocks.1.head_op": "skip"}, "blocks[1].head_op"),
    ({"stem.out": "16"}, "stem.out"),
    ({"last_conv": {"op": "conv1x1"}}, "last_conv"),
    ({"input_size": 0}, "input_size"),
    ({"blocks": []}, "blocks"),
])
def test_bad_documents_name_the_field(changes, field):
    with pytest.raises(ArchError) as info:
        Arch.from_dict(_doc(**changes))
    assert info.value.field == field, str(info.value)
    assert field in str(info.value)


def test_bad_json_and_metadata():
    with pytest.raises(ArchError, match="not valid JSON"):
        Arch.from_json("{not json")
    with pytest.raises(ArchError, match="metadata"):
        load_arch("densenas_a_cvpr2020").replace(metadata={"x": object()})


@pytest.mark.parametrize("text, field", [
    ("[[16, 16], 'mbconv_k3_t1', ['mbconv_k3_t3'], 2, 1]", "official[0][3]"),
    ("[[16, 16], 'mbconv_k3_t1', [], 0, 1]|__import__('os').system('echo pwned')", "official[1]"),
    ("[[16, 16], 'mbconv_k3_t1', [], 0]", "official[0]"),
    ("[[16, 16], 'mbconv_k3_t1', [], 0, 1]|[[16, 1984], 'conv1_1']|[[16, 16], 'mbconv_k3_t1', [], 0, 1]",
     "official[2]"),
    ("[[16, 16], 'mbconv_k3_t1', [], 0, 1]|[[24, 1984], 'conv1_1']", "official[1][0][0]"),
    ("[[16, 16], 'conv_k3', [], 0, 1]", "official[0][1]"),
    ("[[16, 16], 'mbconv_k3_t1', [], 0, 1]|[[24, 32], 'mbconv_k3_t3', [], 0, 2]", "blocks[1].in"),
])
def test_bad_official_strings_name_the_entry(text, field):
    with pytest.raises(ArchError) as info:
        Arch.from_official(text)
    assert info.value.field == field, str(info.value)


def test_last_conv_channels_only_when_the_string_has_none(reference):
    with pytest.raises(ArchError, match="last_conv_channels"):
        Arch.from_official(reference["densenas_a_cvpr2020"]["official"], last_conv_channels=1728)


def test_stats_cli(capsys):
    assert main(["stats", "densenas_a_cvpr2020", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["params"] / 1e6 == pytest.approx(4.768, rel=0.005)
    assert stats["macs"] / 1e6 == pytest.approx(251.33, rel=0.005)
    assert stats["one_line"].startswith("16-k3e1 | 24:s2 k3e3")
    assert main(["stats", "no_such_net"]) == 2
    assert "no_such_net" in capsys.readouterr().err
    assert main(["convert", "densenas_a_cvpr2020", "--to", "official"]) == 0
    assert Arch.from_official(capsys.readouterr().out.strip()) == load_arch("densenas_a_cvpr2020")
    assert isinstance(build_model("mobilenet_v2_1_0"), DenseNASNet)
