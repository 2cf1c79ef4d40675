"""Search space: the paper's facts, the dense edge rule on hand-checked spaces, validation, round trips."""
import copy
import json

import pytest
import yaml

from densenas.space import SearchSpace, SpaceError, list_presets, load_space, main, spaces_dir

# A hand-checked space (no first layer; block 0 = stem output 8@16):
#   block: 0     1     2     3      4      5      6
#   width: 8     8     8     16     16     24     24
#   res:   16    16    8     8      4      4      4
#   stage: 0     1     1     2      2      3      3
HAND = {
    "input_size": 16, "in_channels": 1,
    "stem": {"op": "conv3x3", "out": 8, "stride": 1},
    "widths": [8, 8, 16, 16, 24, 24],
    "resolutions": [16, 8, 8, 4, 4, 4],
    "stage_ids": [1, 1, 2, 2, 3, 3],
    "stacking_layers": [0, 1, 1, 0, 1, 0],
    "connections_m": 4,
    "last_conv_channels": 32,
    "stacking_ops": ["mbconv_k3_t3", "skip_connect"],
    "head_ops": ["mbconv_k3_t3", "mbconv_k5_e6"],
}


def test_presets_ship():
    assert {"imagenet_mbconv", "imagenet_resnet", "tiny_mbconv", "micro_mbconv", "tiny_resnet"} <= set(list_presets())
    assert (spaces_dir() / "imagenet_mbconv.yaml").exists()


def test_imagenet_mbconv_paper_facts():
    space = load_space("imagenet_mbconv")
    facts = yaml.safe_load(open(spaces_dir() / "imagenet_mbconv.yaml"))["facts"]
    assert space.num_blocks == facts["searchable_blocks"] == 16
    assert len(space.edges) == facts["edges"] == 54
    assert len(space.head_edges) == 51 and len(space.final_edges) == 3
    paths = space.paths()
    assert len(paths) == len(set(paths)) == space.num_paths() == facts["distinct_block_paths"] == 15456
    assert space.num_arch_parameters() == facts["architecture_scalars"] == 633
    assert space.final_blocks == (14, 15, 16)
    assert space.blocks[0] == (0, 16, 112, 0, 0)
    # every path starts at the fixed block, goes through the 24@56 block and ends in a final block
    assert all(p[0] == 0 and p[1] == 1 and p[-1] in space.final_blocks for p in paths)


def test_imagenet_resnet_shape():
    space = load_space("imagenet_resnet")
    assert space.first_layer is None and space.cost == "macs"
    assert space.blocks[0] == (0, 32, 112, 0, 0)  # the stem output is block 0
    assert space.out_edges(0) == [(0, 1, 2)]
    assert space.num_blocks == 20 and space.final_blocks == (18, 19, 20)


def test_edge_rule_micro():
    space = load_space("micro_mbconv")
    end = space.end_node
    assert end == 5
    assert list(space.edges) == [(0, 1, 2), (1, 2, 1), (1, 3, 2), (1, 4, 2), (2, 3, 2), (2, 4, 2),
                                 (3, 4, 1), (3, end, 1), (4, end, 1)]
    assert space.in_edges(4) == [(3, 4, 1), (2, 4, 2), (1, 4, 2)]
    assert space.out_edges(3) == [(3, 4, 1), (3, end, 1)]
    assert sorted(space.paths()) == sorted([(0, 1, 2, 3), (0, 1, 2, 3, 4), (0, 1, 2, 4),
                                            (0, 1, 3), (0, 1, 3, 4), (0, 1, 4)])


def test_edge_rule_hand_space():
    space = load_space(HAND)
    assert [tuple(b) for b in space.blocks] == [
        (0, 8, 16, 0, 0), (1, 8, 16, 1, 0), (2, 8, 8, 1, 1), (3, 16, 8, 2, 1),
        (4, 16, 4, 2, 0), (5, 24, 4, 3, 1), (6, 24, 4, 3, 0)]
    # 1->4 stops the walk of block 1 (ratio 4); 2->5 stops block 2 (stage 3 > 1 + 1);
    # block 3's walk is cut by m only after the last block.
    assert list(space.edges) == [(0, 1, 1), (1, 2, 2), (1, 3, 2), (2, 3, 1), (2, 4, 2),
                                 (3, 4, 2), (3, 5, 2), (3, 6, 2), (4, 5, 1), (4, 6, 1),
                                 (5, 6, 1), (5, 7, 1), (6, 7, 1)]
    assert space.final_blocks == (5, 6)
    assert space.num_paths() == len(space.paths()) == 15
    assert space.head_ops == ("mbconv_k3_e3", "mbconv_k5_e6") and space.stacking_ops[-1] == "skip"
    # m = 2 cuts block 3's walk after block 5
    m2 = load_space({**HAND, "connections_m": 2})
    assert [e for e in m2.edges if e[0] == 3] == [(3, 4, 2), (3, 5, 2)]
    assert m2.num_paths() == 13


def test_round_trip_and_hash(tmp_path):
    for name in ("imagenet_mbconv", "imagenet_resnet", "tiny_mbconv"):
        space = load_space(name)
        again = load_space(space.to_dict())
        assert again.to_dict() == space.to_dict() and again.space_hash() == space.space_hash()
        assert json.loads(json.dumps(space.to_dict())) == space.to_dict()
    a = load_space(HAND)
    aliases = copy.deepcopy(HAND)
    aliases["stacking_ops"] = ["mbconv_k3_e3", "skip"]
    assert load_space(aliases).space_hash() == a.space_hash()  # aliases are canonicalised
    assert load_space({**HAND, "connections_m": 3}).space_hash() != a.space_hash()
    path = tmp_path / "hand.yaml"
    path.write_text(yaml.safe_dump(HAND))
    from_file = load_space(str(path))
    assert from_file == a and from_file.name == "hand"


def _bad(**changes):
    doc = copy.deepcopy(HAND)
    for k, v in changes.items():
        if v is None:
            doc.pop(k)
        else:
            doc[k] = v
    return doc


@pytest.mark.parametrize("doc,field,words", [
    (_bad(widths=[8, 8, 16, 12, 24, 24]), "widths[3]", "shrinks"),
    (_bad(resolutions=[16, 8, 8, 2, 2, 2]), "resolutions[3]", "ratio 1 or 2"),
    (_bad(resolutions=[4, 4, 4, 4, 4, 4]), "input_size", "ratio 1 or 2"),
    (_bad(stage_ids=[1, 1, 2, 2, 4, 4]), "stage_ids[4]", "reached by no path"),
    (_bad(connections_m=0), "connections_m", ">= 1"),
    (_bad(head_ops=["mbconv_k3_e3", "mbconv_k9_e3"]), "head_ops[1]", "unknown op"),
    (_bad(head_ops=["mbconv_k3_e3", "skip"]), "head_ops", "skip cannot be a head op"),
    (_bad(input_size=15), "input_size", "ratio 1 or 2"),
    (_bad(input_size=18, stem={"op": "conv3x3", "out": 8, "stride": 2},
          first_layer={"op": "mbconv_k3_e1", "out": 8, "stride": 2}), "input_size", "not divisible"),
    (_bad(stage_ids=[1, 1, 2, 2, 3]), "stage_ids", "has 5 entries but widths has 6"),
    (_bad(connections_m=None), "connections_m", "missing"),
    (_bad(stem={"op": "conv3x3", "out": 8}), "stem", "missing stride"),
    (_bad(widthz=[1]), "widthz", "unknown field"),
    (_bad(cost="flops"), "cost", "must be one of"),
])
def test_invalid_spaces(doc, field, words):
    with pytest.raises(SpaceError) as e:
        load_space(doc)
    assert e.value.field == field
    assert words in str(e.value) and repr(field) in str(e.value)


def test_unknown_preset():
    with pytest.raises(SpaceError, match="no preset named 'nope'.*imagenet_mbconv"):
        load_space("nope")


def test_cli_stats(capsys):
    assert main(["stats", "micro_mbconv", "--json", "--num-classes", "10"]) == 0
    stats = json.loads(capsys.readouterr().out)
    space = load_space("micro_mbconv")
    assert stats["searchable_blocks"] == 4 and stats["edges"] == 9 and stats["distinct_block_paths"] == 6
    assert stats["architecture_scalars"] == space.num_arch_parameters() == 3 * 3 + 7 * 2 + 9
    assert stats["supernet_params"] > 0 and stats["space_hash"] == space.space_hash()
