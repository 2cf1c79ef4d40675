"""SuperNet: the paper's counts, forward modes, where gradients land, only sampled ops run."""
import pytest
import torch
import torch.nn.functional as F

from densenas.space import load_space
from densenas.supernet import Choices, MixedOp, SuperNet


@pytest.fixture(scope="module")
def imagenet_net():
    torch.manual_seed(0)
    return SuperNet("imagenet_mbconv", num_classes=100, bn_affine=False)


@pytest.fixture()
def micro():
    torch.manual_seed(0)
    return SuperNet("micro_mbconv", num_classes=5)


def _x(net, n=4):
    s = net.space
    return torch.randn(n, s.in_channels, s.input_size, s.input_size)


def test_imagenet_counts(imagenet_net):
    net = imagenet_net
    n_weights = sum(p.numel() for p in net.weight_parameters())
    assert abs(n_weights / 90.43e6 - 1) < 1e-3
    assert n_weights == 90_430_100  # the authors' count (their table in shared/reference)
    assert sum(p.numel() for p in net.arch_parameters()) == 633
    assert len(net.mixed_ops) == 51 + 39 and len(net.betas) == 17
    assert sum(p.numel() for p in net.betas) == 54
    assert [m.edge for m in net.mixed_ops if m.kind == "head"][:4] == [(0, 1), (1, 2), (2, 3), (1, 3)]
    names = dict(net.named_parameters())
    for key in ("blocks.1.heads.from_0.alpha", "blocks.5.stack.2.alpha", "betas.16",
                "blocks.16.heads.from_12.ops.5.body.3.weight", "final_convs.block_14.conv.weight",
                "classifier.weight", "stem.conv.weight", "first_layer.body.0.weight"):
        assert key in names, key
    assert names["final_convs.block_15.conv.weight"].shape == (1984, 352, 1, 1)
    assert set(net.edge_probs()) == {(i, j) for (i, j, _) in net.space.edges}


def _called_ops(net):
    called = []
    hooks = [op.register_forward_hook(lambda m, i, o, k=(mi, oi): called.append(k))
             for mi, m in enumerate(net.mixed_ops) for oi, op in enumerate(m.ops)]
    return called, hooks


@pytest.mark.parametrize("mode", ["uniform1", "alpha1", "alpha2", "all"])
@pytest.mark.parametrize("arch_grad", [True, False])
def test_forward_modes_run_only_sampled_ops(micro, mode, arch_grad):
    net = micro
    choices = net.sample_choices(mode, torch.Generator().manual_seed(1))
    assert isinstance(choices, Choices) and len(choices) == len(net.mixed_ops)
    expected = {(k, i) for k, c in enumerate(choices) for i in c}
    called, hooks = _called_ops(net)
    out = net(_x(net), choices, arch_grad=arch_grad)
    for h in hooks:
        h.remove()
    assert out.shape == (4, 5)
    assert sorted(called) == sorted(expected)  # each chosen op once: every block computed once
    F.cross_entropy(out, torch.arange(4)).backward()
    for k, (m, c) in enumerate(zip(net.mixed_ops, choices)):
        for i, op in enumerate(m.ops):
            grads = [p.grad for p in op.parameters()]
            if i in c:
                assert all(g is not None for g in grads), (k, i)
            else:
                assert all(g is None for g in grads), (k, i)  # unsampled ops were not run
        g = m.alpha.grad
        if not arch_grad or len(c) == 1:
            assert g is None or not g.any()
        else:
            unsampled = [i for i in range(len(m.op_names)) if i not in c]
            assert g[list(c)].abs().sum() > 0 and not g[unsampled].any()
    for i, beta in enumerate(net.betas):
        if not arch_grad:
            assert beta.grad is None
        elif beta.numel() > 1:
            assert beta.grad is not None and beta.grad.abs().sum() > 0, i


def test_arch_grad_false_same_values(micro):
    net = micro.eval()
    with torch.no_grad():
        for p in net.arch_parameters():
            p.normal_()
    choices = net.sample_choices("alpha2", torch.Generator().manual_seed(3))
    x = _x(net)
    a = net(x, choices, arch_grad=True)
    b = net(x, choices, arch_grad=False)
    assert torch.allclose(a, b, atol=1e-6)
    assert a.requires_grad and b.grad_fn is not None
    # the weight-step graph does not reach alpha or beta
    seen, stack = set(), [b.grad_fn]
    arch = {id(p) for p in net.arch_parameters()}
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            assert id(fn.variable) not in arch
        stack.extend(f for f, _ in fn.next_functions)


def test_forward_matches_reference_formula(micro):
    """Block input = sum over in-edges of p(edge) * head(x_src); pair outputs mixed by softmax(alpha pair)."""
    net = micro.eval()
    with torch.no_grad():
        for p in net.arch_parameters():
            p.normal_()
    choices = net.sample_choices("alpha2", torch.Generator().manual_seed(5))
    x = _x(net)
    probs = net.edge_probs()
    space = net.space

    def mixed(m, c, h):
        w = F.softmax(m.alpha[list(c)], 0)
        return sum(w[k] * m.ops[i](h) for k, i in enumerate(c)) if len(c) > 1 else m.ops[c[0]](h)

    by_op = {id(m): c for m, c in zip(net.mixed_ops, choices)}
    with torch.no_grad():
        outs = {0: net.first_layer(net.stem(x))}
        for b in space.blocks[1:]:
            sb = net.blocks[b.index]
            h = sum(probs[(i, j)] * mixed(sb.heads[f"from_{i}"], by_op[id(sb.heads[f"from_{i}"])], outs[i])
                    for (i, j, _) in space.in_edges(b.index))
            for layer in sb.stack:
                h = mixed(layer, by_op[id(layer)], h)
            outs[b.index] = h
        z = sum(probs[(b, space.end_node)] * net.final_convs[f"block_{b}"](outs[b]) for b in space.final_blocks)
        ref = net.classifier(z.mean((2, 3)))
        got = net(x, choices)
    assert torch.allclose(got, ref, atol=1e-5)
    # edge probabilities of every source sum to one
    for i in range(len(space.blocks)):
        assert torch.isclose(sum(probs[(i, j)] for (_, j, _) in space.out_edges(i)), torch.tensor(1.0))


def test_sampling(micro):
    net = micro
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert net.sample_choices("uniform1", g1) == net.sample_choices("uniform1", g2)
    with torch.no_grad():
        for m in net.mixed_ops:
            m.alpha.fill_(-20.0)
            m.alpha[-1] = 20.0
    assert all(c == (len(m.op_names) - 1,) for c, m in zip(net.sample_choices("alpha1", g1), net.mixed_ops))
    for _ in range(5):
        for c, m in zip(net.sample_choices("alpha2", g1), net.mixed_ops):
            assert len(c) == min(2, len(m.op_names)) == len(set(c)) and len(m.op_names) - 1 in c
    counts = torch.zeros(3)
    for _ in range(300):
        counts[net.sample_choices("uniform1", g1)[0][0]] += 1  # mixed op 0 has 2 head ops
    assert counts[2] == 0 and counts[0] > 100 and counts[1] > 100
    with pytest.raises(ValueError, match="unknown sampling mode"):
        net.sample_choices("top2")
    with pytest.raises(ValueError, match="mixed ops"):
        net(_x(net), [(0,)])


def test_state_dict_round_trip_and_resnet():
    a = SuperNet("micro_mbconv", 5)
    b = SuperNet(load_space("micro_mbconv"), 5)
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(2, 1, 16, 16)
    a.eval(), b.eval()
    assert torch.equal(a(x), b(x))
    assert len(a.arch_parameters()) + len(a.weight_parameters()) == len(list(a.parameters()))
    assert all(isinstance(m, MixedOp) for m in a.mixed_ops)
    # ResNet-style space: BasicBlock heads, basic_block/skip stacking, a classifier per final block
    r = SuperNet("tiny_resnet", 3)
    out = r(torch.randn(2, 1, 32, 32), r.sample_choices("alpha2", torch.Generator().manual_seed(0)))
    out.sum().backward()
    assert out.shape == (2, 3) and set(r.classifiers) == {"block_5", "block_6"}


def test_memory_format_does_not_change_the_computation():
    """channels_last (the default, faster on CPU) and NCHW super networks compute the same logits and
    the same gradients from the same weights: the format is a speed choice, not a change of the method."""
    torch.manual_seed(0)
    nhwc = SuperNet("micro_mbconv", 5, channels_last=True)
    nchw = SuperNet("micro_mbconv", 5, channels_last=False)
    nchw.load_state_dict(nhwc.state_dict())
    assert nhwc.stem.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert nchw.stem.conv.weight.is_contiguous()
    choices = nhwc.sample_choices("alpha2", torch.Generator().manual_seed(2))
    x = _x(nhwc)
    outs = []
    for net in (nhwc, nchw):
        out = net(x, choices)
        F.cross_entropy(out, torch.arange(4)).backward()
        outs.append(out)
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    grads = [dict((n, p.grad) for n, p in net.named_parameters() if p.grad is not None) for net in (nhwc, nchw)]
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-4, rtol=1e-3), n


@pytest.mark.parametrize("native_flag", ["0", "1"])
@pytest.mark.parametrize("c_in,c_out,stride,choice,scaled", [
    (8, 8, 1, (0, 3), True),     # residual MBConvs (stacking layer) under a head-like scale
    (8, 8, 1, (2, 6), False),    # a residual MBConv and skip, no scale
    (8, 8, 1, (6,), True),       # skip alone, scaled
    (8, 16, 2, (1, 5), True),    # non-residual (a head: width and stride change)
    (8, 16, 2, (4,), True),      # one op, scaled
])
def test_mixed_op_folded_weights_equal_weighting_the_outputs(monkeypatch, native_flag, c_in, c_out, stride,
                                                             choice, scaled):
    from densenas.space import load_space

    monkeypatch.setenv("DENSENAS_NATIVE", native_flag)
    names = load_space("imagenet_mbconv").stacking_ops if stride == 1 else load_space("imagenet_mbconv").head_ops
    torch.manual_seed(3)
    m = MixedOp(names, c_in, c_out, stride, False, "stack", 1, layer=0).to(memory_format=torch.channels_last)
    with torch.no_grad():
        m.alpha.normal_()
    x = torch.randn(4, c_in, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
    scale = torch.tensor(0.37, requires_grad=True) if scaled else None
    g = torch.randn(4, c_out, 8 // stride, 8 // stride)

    out = m(x, choice, True, scale=scale)
    grads = torch.autograd.grad((out * g).sum(), [x, m.alpha] + ([scale] if scaled else []), allow_unused=True)

    # The plain definition: softmax weights times each op's full output (residual included), times scale.
    w = F.softmax(m.alpha[list(choice)], 0) if len(choice) > 1 else torch.ones(1)
    ref = sum(w[k] * m.ops[i](x) for k, i in enumerate(choice))
    ref = ref * scale if scaled else ref
    ref_grads = torch.autograd.grad((ref * g).sum(), [x, m.alpha] + ([scale] if scaled else []), allow_unused=True)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        if a is None or b is None:  # alpha with one chosen op: unused on both sides
            assert a is None and b is None
            continue
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
