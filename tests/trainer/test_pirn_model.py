"""PIRN's decoder pieces against direct implementations of the paper's equations, on tiny
random DINOv2 encoders."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edge_inspect.trainer.backbones.dinov2 import DINOV2_CONFIGS, Dinov2Backbone
from edge_inspect.trainer.heads.pirn import PirnConfig, PirnHead, sinkhorn
from edge_inspect.trainer.heads.pirn.model import DecoderLayer, cosine_cost, cross_modal_edges


def _encoder(seed=0):
    torch.manual_seed(seed)
    enc = Dinov2Backbone(DINOV2_CONFIGS["tiny-dinov2"])
    enc.set_input_size(112)
    return enc.eval()


def _head(**kw):
    cfg = PirnConfig(**({"taps": (1, 2, 3), "prototypes": 8} | kw))
    torch.manual_seed(1)
    return PirnHead({"rgb": _encoder(0), "normals": _encoder(0)}, cfg)


def _planes(batch=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    rgb = torch.randn(batch, 3, 112, 112, generator=g)
    xyz = torch.rand(batch, 3, 112, 112, generator=g) * 0.1 + torch.tensor([0.0, 0.0, 0.5]).view(1, 3, 1, 1)
    return rgb, xyz


def test_sinkhorn_is_balanced_and_converges_to_the_plain_algorithm():
    g = torch.Generator().manual_seed(0)
    cost = torch.rand(3, 50, 7, generator=g, dtype=torch.float64)
    plan = sinkhorn(cost, 0.05, 3)
    np.testing.assert_allclose(plan.sum(1).numpy(), 1 / 7, atol=1e-3 / 7)  # columns: 1/K
    # many iterations: the textbook (non-log) Sinkhorn's fixed point, rows 1/N as well
    c = cost[0].numpy()
    kernel = np.exp(-c / 0.05)
    u, v = np.ones(50), np.ones(7)
    for _ in range(2000):
        u = (1 / 50) / (kernel @ v)
        v = (1 / 7) / (kernel.T @ u)
    want = u[:, None] * kernel * v[None]
    np.testing.assert_allclose(sinkhorn(cost, 0.05, 2000)[0].numpy(), want, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(want.sum(1), 1 / 50, rtol=1e-6)


def test_balanced_assignment_uses_every_prototype_where_softmax_collapses():
    # every token is closest to prototype 0: softmax gives it almost all of the mass (codebook
    # collapse), BPA's balanced plan still gives each prototype 1/K of it
    torch.manual_seed(0)
    protos = torch.randn(1, 6, 16)
    tokens = protos[:, :1] + 0.3 * torch.randn(1, 40, 16)
    ot = DecoderLayer(PirnConfig(prototypes=6, mnc=False), 16).assign(tokens, protos)
    soft = DecoderLayer(PirnConfig(prototypes=6, mnc=False, assignment="softmax"), 16).assign(tokens, protos)
    np.testing.assert_allclose(ot.sum(2).numpy(), 1.0, rtol=1e-6)  # barycentric rows
    share_ot = (ot.sum(1) / 40)[0]
    share_soft = (soft.sum(1) / 40)[0]
    assert share_soft[0] > 0.9 and share_ot.max() < 0.35


def test_enough_iterations_keep_prototype_shares_balanced_after_the_row_renormalization():
    torch.manual_seed(0)
    tokens = torch.randn(4, 8, 64).repeat_interleave(32, 1) + 0.3 * torch.randn(4, 256, 64)
    protos = tokens[:, torch.randperm(256)[:16]] + 0.3 * torch.randn(4, 16, 64)

    def shares(iters):
        layer = DecoderLayer(PirnConfig(prototypes=16, mnc=False, sinkhorn_iters=iters), 64)
        w = layer.assign(tokens, protos)
        return w.sum(1) / 256 * 16  # 1 = the fair share

    assert shares(3).max() > 1.5  # SwAV's 3 iterations: some prototype takes far more
    default = shares(PirnConfig().sinkhorn_iters)
    assert 0.97 < default.min() and default.max() < 1.03


def test_gat_and_cross_attention_equal_direct_implementations():
    from edge_inspect.trainer.heads.pirn.model import CrossAttention, GraphAttention

    torch.manual_seed(5)
    gat = GraphAttention(8, 2)
    nodes = torch.randn(1, 6, 8)
    edges = torch.rand(1, 6, 6) > 0.5
    edges |= torch.eye(6, dtype=torch.bool)[None]
    out = torch.zeros(6, 8)
    for h in range(2):  # Velickovic et al.: per head, softmax over i's neighbours
        w = gat.w.weight[h * 4:(h + 1) * 4]
        wh = nodes[0] @ w.T
        for i in range(6):
            js = [j for j in range(6) if edges[0, i, j]]
            e = torch.stack([F.leaky_relu(gat.a_src[h] @ wh[i] + gat.a_dst[h] @ wh[j], 0.2) for j in js])
            alpha = torch.softmax(e, 0)
            out[i, h * 4:(h + 1) * 4] = sum(a * wh[j] for a, j in zip(alpha, js, strict=True))
    torch.testing.assert_close(gat(nodes, edges)[0], nodes[0] + gat.out(out))

    ca = CrossAttention(8)
    with torch.no_grad():
        ca.gamma.fill_(0.8)
    q, p = torch.randn(1, 5, 8), torch.randn(1, 4, 8)
    attn = torch.softmax((q[0] @ ca.q.weight.T) @ (p[0] @ ca.k.weight.T).T / 8 ** 0.5, dim=1)  # Eq. 4
    want = q[0] + torch.tanh(torch.tensor(0.8)) * attn @ (p[0] @ ca.v.weight.T)  # Eq. 5
    torch.testing.assert_close(ca(q, p)[0], want)


def test_apr_context_is_the_plan_weighted_mean_fed_to_the_gru():
    layer = DecoderLayer(PirnConfig(prototypes=5, mnc=False), 12)
    torch.manual_seed(2)
    tokens, protos = torch.randn(2, 30, 12), torch.randn(2, 5, 12)
    plan = sinkhorn(cosine_cost(tokens, protos), 0.05, layer.cfg.sinkhorn_iters)
    context = torch.stack([torch.stack([(plan[b, :, k, None] * tokens[b]).sum(0) / plan[b, :, k].sum()
                                        for k in range(5)]) for b in range(2)])  # Eq. 3
    want = layer.gru["rgb"](context.reshape(10, 12), protos.reshape(10, 12)).reshape(2, 5, 12)
    torch.testing.assert_close(layer.refine(tokens, protos, "rgb"), want)
    layer.cfg.apr = "none"
    assert torch.equal(layer.refine(tokens, protos, "rgb"), protos)


def test_graph_joins_each_prototype_to_its_nearest_prototypes_of_the_other_modality():
    torch.manual_seed(4)
    rgb, sn = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    edges = cross_modal_edges(rgb, sn, 2)
    assert edges.shape == (2, 12, 12)
    assert torch.equal(edges[:, :6, :6], torch.eye(6, dtype=torch.bool).expand(2, 6, 6))
    assert torch.equal(edges[:, 6:, 6:], torch.eye(6, dtype=torch.bool).expand(2, 6, 6))
    assert (edges[:, :6, 6:].sum(2) == 2).all() and (edges[:, 6:, :6].sum(2) == 2).all()
    sim = F.normalize(rgb, dim=-1) @ F.normalize(sn, dim=-1).transpose(1, 2)
    nearest = sim.argmax(2)
    assert edges[:, :6, 6:].gather(2, nearest[..., None]).all()


def test_gate_starts_closed_so_mnc_adds_only_the_purified_tokens():
    head = _head()
    rgb, xyz = _planes()
    encoded = head.encode(rgb, xyz)
    layer = head.layers[0]
    tokens, protos = encoded, head.initial_prototypes(2)
    out, refined = layer(tokens, protos)
    for m in ("rgb", "normals"):
        bpa = layer.assign(tokens[m], refined[m]) @ refined[m]
        torch.testing.assert_close(out[m], bpa + tokens[m] * torch.sigmoid(bpa))
    no_mnc = _head(mnc=False)
    out2, refined2 = no_mnc.layers[0](tokens, no_mnc.initial_prototypes(2))
    want = no_mnc.layers[0].assign(tokens["rgb"], refined2["rgb"]) @ refined2["rgb"]
    torch.testing.assert_close(out2["rgb"], want)  # without MNC, Z_rec = Z_bpa


def test_head_scores_trains_only_the_decoder_and_can_be_rgb_only():
    head = _head()
    rgb, xyz = _planes()
    for cross in (head.layers[0].attend["rgb"], head.layers[0].attend["normals"]):
        with torch.no_grad():
            cross.gamma.fill_(0.5)
    score, amap = head(rgb, xyz)
    assert score.shape == (2,) and amap.shape == (2, 112, 112)
    torch.testing.assert_close(score, amap.flatten(1).amax(1))
    (score.sum() + amap.mean()).backward()
    trainable = {n for n, p in head.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("encoders.") for n in trainable)
    for name in ("codebook.rgb", "codebook.normals", "layers.0.gru.rgb.weight_hh",
                 "layers.0.gat.w.weight", "layers.0.attend.normals.v.weight"):
        assert dict(head.named_parameters())[name].grad.abs().sum() > 0, name
    rgb_only = _head(modalities=("rgb",))
    assert rgb_only.planes == () and head.planes == ("xyz",)
    s1, _ = rgb_only(rgb)
    s2, _, _ = rgb_only.forward_with_state(rgb, xyz)  # the geometry is not looked at
    torch.testing.assert_close(s1, s2)
    with pytest.raises(ValueError, match=r"takes the planes \[\] after the RGB image, got 1"):
        rgb_only(rgb, xyz)
    with pytest.raises(ValueError, match=r"takes the planes \['xyz'\] after the RGB image, got 0"):
        head(rgb)
    with pytest.raises(ValueError, match="needs the 3D plane"):
        head(rgb, None)
    with pytest.raises(ValueError, match="head.assignment 'sigmoid' unknown"):
        PirnConfig(assignment="sigmoid")


def test_two_plane_graph_exports_with_parity(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    head = _head(layers=2, fill_invalid=2).eval()  # the normals' fill runs in the graph too
    for layer in head.layers:
        for cross in layer.attend.values():
            with torch.no_grad():
                cross.gamma.fill_(0.7)
    rgb, xyz = _planes(2, seed=5)
    xyz[:, :, 10:20, 30:40] = 0.0  # missing points go through the graph too
    path = tmp_path / "pirn.onnx"
    torch.onnx.export(head, (rgb, xyz), str(path), opset_version=17, dynamo=False,
                      input_names=["rgb", "xyz"], output_names=["score", "map"],
                      dynamic_axes={"rgb": {0: "b"}, "xyz": {0: "b"}, "score": {0: "b"}, "map": {0: "b"}})
    rgb, xyz = _planes(3, seed=6)
    with torch.no_grad():
        want_score, want_map = head(rgb, xyz)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got_score, got_map = sess.run(None, {"rgb": rgb.numpy(), "xyz": xyz.numpy()})
    assert np.abs(got_score - want_score.numpy()).max() <= 1e-4
    assert np.abs(got_map - want_map.numpy()).max() <= 1e-3


def test_soft_mining_scales_each_tokens_gradient_by_its_relative_distance_cubed():
    from edge_inspect.trainer.heads.pirn.losses import soft_mining_loss

    torch.manual_seed(7)
    target = torch.randn(2, 10, 6)
    rec = (target + torch.randn(2, 10, 6)).requires_grad_()
    plain = rec.detach().clone().requires_grad_()
    loss = soft_mining_loss({"rgb": target}, {"rgb": rec})
    want = (1 - F.cosine_similarity(target.flatten(1), plain.flatten(1), dim=1)).mean()
    torch.testing.assert_close(loss, want.detach())
    loss.backward()
    want.backward()
    d = 1 - F.cosine_similarity(target, plain.detach(), dim=-1)
    factor = (d / d.mean()) ** 3
    torch.testing.assert_close(rec.grad, plain.grad * factor[..., None])
    with pytest.raises(ValueError, match="same modalities"):
        soft_mining_loss({"rgb": target}, {"normals": rec})


def test_carried_training_also_reconstructs_from_prototypes_carried_through_other_shots():
    from edge_inspect.trainer.heads.pirn.losses import soft_mining_loss
    from edge_inspect.trainer.heads.pirn.train import PirnTraining

    head = _head(carried_training=True)
    rgb, xyz = _planes(batch=3)
    training = PirnTraining()
    encoded = training.frozen_features(head, rgb, xyz)
    # one hop: each image starts from the codebook refined by the image before it in the batch
    with torch.no_grad():
        _, refined = head.decode({m: e.roll(1, dims=0) for m, e in encoded.items()})
        start = head.carried_start(encoded, 1)
        two = head.carried_start(encoded, 2)
        _, older = head.decode({m: e.roll(2, dims=0) for m, e in encoded.items()})
        _, again = head.decode({m: e.roll(1, dims=0) for m, e in encoded.items()}, older)
    for m in head.cfg.modalities:
        torch.testing.assert_close(start[m], refined[m])
        # two hops: refined by the image two before, then by the one before
        torch.testing.assert_close(two[m], again[m])
        assert not torch.allclose(two[m], start[m])
    torch.manual_seed(0)
    hops = int(torch.randint(1, 4, ()))
    torch.manual_seed(0)
    loss, logged = training.loss(head, encoded, torch.zeros(3), torch.zeros(3), None)
    with torch.no_grad():
        plain, _ = head.decode(encoded)
        carried, _ = head.decode(encoded, head.carried_start(encoded, hops))
        want = [torch.stack([soft_mining_loss({m: encoded[m]}, {m: rec[m]})
                             for m in head.cfg.modalities]).mean() for rec in (plain, carried)]
    torch.testing.assert_close(loss.detach(), (want[0] + want[1]) / 2)
    assert set(logged) == {"rgb", "normals", "carried"}
    loss.backward()
    assert head.codebook["rgb"].grad.abs().sum() > 0
    _, logged = PirnTraining().loss(_head(), encoded, torch.zeros(3), torch.zeros(3), None)
    assert "carried" not in logged
