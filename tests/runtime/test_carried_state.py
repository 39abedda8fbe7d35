"""PIRN's carried mode (issue 14, item 4): the refined prototypes of a frame scored normal are
the next frame's starting prototypes, per camera; an anomalous frame leaves the state as it
was; a sequence restart and a control command reset it; export proves two carried steps."""

import json
import shutil
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from edge_inspect.runtime.bundle import BundleError, load_bundle
from edge_inspect.runtime.engines import open_engine
from edge_inspect.runtime.synthetic_rgbd import render
from edge_inspect.runtime.transport.sockets import Sender, TransportConfig
from edge_inspect.runtime.transport.wire import encode_frame

SIZE = 112
OVERRIDES = ["train.epochs=60", "shots=8", "head.carried_training=true", "calibration.normals=24",
             "data.target=[{name: rgbd, kind: rgbd_synthetic, count: 40, size: 112, seed: 1}]"]


@pytest.fixture(scope="module")
def pirn_run(tmp_path_factory):
    """A tiny PIRN run, barely trained, and its calibrated checkpoint (eval writes it)."""
    from edge_inspect.trainer.config import RunConfig
    from edge_inspect.trainer.evaluate import evaluate_run
    from edge_inspect.trainer.fit import train
    from tests.conftest import ROOT

    base = tmp_path_factory.mktemp("pirn-carried")
    cfg = RunConfig.from_yaml(ROOT / "configs/pirn/tiny-rgbd.yaml", OVERRIDES)
    ckpt = train(cfg, base / "run")
    evaluate_run(cfg, ckpt, base / "run" / "eval")
    (calibrated,) = (base / "run" / "eval" / "enrolled").glob("*.safetensors")
    return base / "run", calibrated


@pytest.fixture(scope="module")
def carried_bundle(pirn_run, tmp_path_factory):
    from edge_inspect.export.bundle_writer import export_bundle

    run, calibrated = pirn_run
    return export_bundle(run, tmp_path_factory.mktemp("carried") / "bundle", calibrated, carry_state=True)


def test_carried_forward_from_the_codebook_is_the_stateless_model(pirn_run):
    from edge_inspect.trainer.config import RunConfig
    from edge_inspect.trainer.evaluate import load_head

    run, calibrated = pirn_run
    head = load_head(RunConfig.from_yaml(run / "config.yaml"), calibrated).eval()
    g = torch.Generator().manual_seed(0)
    rgb, xyz = torch.randn(3, 3, SIZE, SIZE, generator=g), torch.randn(3, 3, SIZE, SIZE, generator=g)
    initial = head.initial_state()
    assert initial.shape == (2, head.cfg.prototypes, head.dim)
    with torch.no_grad():
        score, amap = head(rgb, xyz)
        start = initial[None].expand(3, -1, -1, -1)
        carried_score, carried_map, state = head.forward_carried(rgb, xyz, state=start)
        other_score, _, _ = head.forward_carried(rgb, xyz, state=state)
    torch.testing.assert_close(carried_score, score, rtol=0, atol=0)
    torch.testing.assert_close(carried_map, amap, rtol=0, atol=0)
    assert state.shape == (3, *initial.shape) and not torch.allclose(state, start)
    assert (other_score - score).abs().max() > 1e-6  # the starting prototypes matter


def test_export_refuses_carried_state_without_a_threshold_or_for_a_stateless_method(pirn_run, runs,
                                                                                    tmp_path):
    from edge_inspect.export.bundle_writer import export_bundle
    from tests.conftest import enrolled

    run, calibrated = pirn_run
    with pytest.raises(ValueError, match="needs a threshold, and .* has none"):
        export_bundle(run, tmp_path / "a", carry_state=True)
    # the same run as if trained from the codebook only
    plain = tmp_path / "plain"
    shutil.copytree(run, plain)
    config = (plain / "config.yaml").read_text()
    assert "carried_training: true" in config
    (plain / "config.yaml").write_text(config.replace("carried_training: true", "carried_training: false"))
    with pytest.raises(ValueError, match="trained from its codebook only"):
        export_bundle(plain, tmp_path / "c", calibrated, carry_state=True)
    with pytest.raises(ValueError, match="the memory head carries no state"):
        export_bundle(runs["memory"], tmp_path / "b", enrolled(runs["memory"]), carry_state=True)
    assert not any((tmp_path / n).exists() for n in "abc")


def test_carried_bundle_declares_its_gated_state_and_passes_two_step_parity(carried_bundle, tmp_path):
    report = json.loads((carried_bundle / "parity.json").read_text())
    assert report["passed"] and report["state_steps"] == 2
    assert report["state_max_abs_diff"] <= 1e-3 and report["state_score_max_abs_diff"] <= 1e-4
    bundle = load_bundle(carried_bundle)
    (state,) = bundle.state
    assert (state.input, state.output, state.gate) == ("state.prototypes", "next.prototypes", "normal")
    assert set(state.reset) == {"reload", "sequence_restart", "command"}
    assert bundle.threshold is not None and state.initial.shape[0] == 2
    # a caller that keeps no state (predict, benchmarks) gets the initial one fed
    engine = open_engine(bundle)
    image, xyz, _ = render(SIZE, np.random.default_rng(0), "good")
    out = engine.infer({"image": image[None], "xyz": xyz[None]}, [bundle.score_output])
    assert np.isfinite(out[bundle.score_output]).all()
    # gate: normal without a threshold is refused at load
    manifest = json.loads((carried_bundle / "manifest.json").read_text())
    manifest["threshold"] = None
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in carried_bundle.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="gate: normal.*no threshold"):
        load_bundle(copy)


def _gated_copy(bundle_dir, folder):
    """The bundle with its threshold between a normal scene's scores and a wrecked frame's
    (a barely trained model separates no real defect), and those two frames. The scores
    depend on the starting prototypes: the normal scene is scored from the codebook and from
    the state it leaves, the wrecked frame from that state (as the test sends them)."""
    bundle = load_bundle(bundle_dir)
    engine = open_engine(bundle)
    initial = bundle.state[0].initial[None]

    def run(frame, state):
        out = engine.infer({"image": frame[0][None], "xyz": frame[1][None], "state.prototypes": state},
                           [bundle.score_output, "next.prototypes"])
        return float(out[bundle.score_output][0]), out["next.prototypes"]

    goods = [render(SIZE, np.random.default_rng([7, i]), "good")[:2] for i in range(6)]
    normal = min(goods, key=lambda g: run(g, initial)[0])
    first, after_one = run(normal, initial)
    low = max(first, run(normal, after_one)[0])
    rng = np.random.default_rng(1)
    noise = [(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8),
              (rng.random((SIZE, SIZE, 3)) * scale).astype(np.float32)) for scale in (0.1, 1, 10)]
    wrecked = max(noise + goods, key=lambda f: run(f, after_one)[0])
    high = run(wrecked, after_one)[0]
    assert high - low > 0.01, (low, high)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    manifest["threshold"]["threshold"] = (low + high) / 2
    folder.mkdir()
    for f in bundle_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder, normal, wrecked


def test_runtime_carries_state_per_camera_from_normal_frames_only(carried_bundle, tmp_path):
    from edge_inspect.runtime.orchestrator import Runtime
    from edge_inspect.runtime.profile import Profile

    gated, normal, wrecked = _gated_copy(carried_bundle, tmp_path / "bundle")
    bundle = load_bundle(gated)
    cams = [{"id": c, "source": "external", "planes": ["rgb", "xyz"]} for c in ("a", "b")]
    rt = Runtime(Profile.from_dict(dict(bundle=str(gated), mode="every_part",
                                        endpoint_dir=str(tmp_path / "ep"), cameras=cams,
                                        http={"port": 0}, model_name="m",
                                        pipeline={"max_batch": 1}))).start()
    tx = Sender(TransportConfig(f"ipc://{tmp_path}/ep/frames", mode="every_part", send_timeout_ms=10000))
    value = rt.metrics.registry.get_sample_value
    slot = rt.pipeline.slot
    sent = {"a": 0, "b": 0}

    def send(cam, frame, seq):
        tx.send(encode_frame(cam, seq, time.time_ns(), {"rgb": frame[0], "xyz": frame[1]}))
        sent[cam] += 1
        deadline = time.monotonic() + 30
        while (value("edge_inspect_frames_inferred_total", {"camera": cam, "model": "m"}) or 0) < sent[cam]:
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.02)
        time.sleep(0.05)  # keep_state runs before publish, but let the batch finish

    def state(cam):
        return slot.state_feeds(slot.current, [cam])["state.prototypes"][0].copy()

    def post(path):
        req = urllib.request.Request(f"http://127.0.0.1:{rt.health.port}{path}", method="POST")
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    initial = bundle.state[0].initial
    try:
        send("a", normal, 0)
        after_one = state("a")
        assert not np.allclose(after_one, initial)
        np.testing.assert_array_equal(state("b"), initial)  # b has seen nothing: not a's state
        send("a", wrecked, 1)
        assert value("edge_inspect_anomalies_total", {"camera": "a", "model": "m"}) == 1
        np.testing.assert_array_equal(state("a"), after_one)  # the gate: an anomaly moves nothing
        send("a", normal, 2)
        after_two = state("a")
        assert not np.allclose(after_two, after_one)
        send("b", normal, 0)  # b starts from the codebook, whatever a carries
        np.testing.assert_allclose(state("b"), after_one, atol=1e-6)
        np.testing.assert_array_equal(state("a"), after_two)
        # a sequence restart scores from the codebook again: the state after it is the first one
        send("a", normal, 0)
        np.testing.assert_allclose(state("a"), after_one, atol=1e-6)
        assert value("edge_inspect_state_resets_total", {"rule": "sequence_restart"}) == 1
        # the control command
        send("a", normal, 1)
        assert post("/state/reset?camera=a") == (200, {"camera": "a", "state_reset": True})
        np.testing.assert_array_equal(state("a"), initial)
        np.testing.assert_allclose(state("b"), after_one, atol=1e-6)  # b keeps its own
        for bad in ("", "?camera=", "?cam=a", "?camera=a&camera=b"):  # never "every camera" by mistake
            code, answer = post(f"/state/reset{bad}")
            assert code == 400 and "error" in answer, bad
        np.testing.assert_allclose(state("b"), after_one, atol=1e-6)
        assert post("/state/reset?camera=*") == (200, {"camera": "*", "state_reset": True})
        np.testing.assert_array_equal(state("b"), initial)
        assert value("edge_inspect_state_resets_total", {"rule": "command"}) == 2
        code, answer = post("/state/reset?camera=nope")
        assert code == 404 and "unknown camera 'nope'" in answer["error"]
        # a reload (a model swap) forgets every camera's state
        send("a", normal, 2)
        slot.swap(slot.current.bundle, slot.current.engine, "m")
        np.testing.assert_array_equal(state("a"), initial)
    finally:
        tx.close()
        rt.shutdown()


def test_one_cameras_frames_in_a_batch_carry_in_turn_and_a_reset_mid_batch_holds(carried_bundle, tmp_path):
    import zmq

    from edge_inspect.runtime.metrics import RuntimeMetrics
    from edge_inspect.runtime.model_slot import ModelSlot
    from edge_inspect.runtime.pipeline import Pipeline, PipelineConfig
    from edge_inspect.runtime.transport.sockets import Receiver
    from edge_inspect.runtime.transport.wire import decode

    gated, normal, _ = _gated_copy(carried_bundle, tmp_path / "bundle")
    bundle = load_bundle(gated)
    engine = open_engine(bundle)
    ctx = zmq.Context()
    frames = TransportConfig(f"ipc://{tmp_path}/frames", mode="every_part")

    def pipeline():
        return Pipeline(ModelSlot(bundle, engine, "m"), Receiver(frames, ctx), [],
                        PipelineConfig(("a", "b"), mode="every_part", max_batch=4), RuntimeMetrics())

    def item(pipe, cam, seq, restart=False):
        msg = decode(encode_frame(cam, seq, time.time_ns(), {"rgb": normal[0], "xyz": normal[1]}))
        return pipe.prepare(msg, time.monotonic_ns(), restart)

    def state(pipe, cam):
        return pipe.slot.state_feeds(pipe.slot.current, [cam])["state.prototypes"][0]

    one_by_one, batched = pipeline(), pipeline()
    want = [one_by_one.infer([item(one_by_one, c, s)])[1]["image_score"][0]
            for c, s in (("a", 0), ("a", 1), ("b", 0), ("a", 2))]
    # the same four frames as one batch: a's frames in turn, each from the state the last left
    _, out, _ = batched.infer([item(batched, c, s) for c, s in (("a", 0), ("a", 1), ("b", 0), ("a", 2))])
    np.testing.assert_allclose(out["image_score"], want, rtol=1e-5)
    for cam in ("a", "b"):
        np.testing.assert_allclose(state(batched, cam), state(one_by_one, cam), atol=1e-6)
    # a restart in the middle of a batch: the old sequence's frame carries, then the reset
    restarted = pipeline()
    _, out, _ = restarted.infer([item(restarted, "a", 5), item(restarted, "a", 0, restart=True)])
    np.testing.assert_allclose(out["image_score"], [want[0], want[0]], rtol=1e-5)  # both from the codebook
    # a reset while a batch is in the engine is not undone by that batch
    racing = pipeline()
    slot = racing.slot
    real_infer = engine.infer

    class ResetDuringInfer:
        def infer(self, feeds, names):
            slot.reset_state("a", "command")
            return real_infer(feeds, names)

    slot.current = type(slot.current)(bundle, ResetDuringInfer(), "m", bundle.threshold)
    racing.infer([item(racing, "a", 0)])
    np.testing.assert_array_equal(state(racing, "a"), bundle.state[0].initial)
    racing.slot.current = type(slot.current)(bundle, engine, "m", bundle.threshold)
    racing.infer([item(racing, "a", 1)])
    assert not np.allclose(state(racing, "a"), bundle.state[0].initial)  # carries again after it
    for pipe in (one_by_one, batched, restarted, racing):
        pipe.close()
    ctx.term()


def test_control_commands_answer_json_and_never_take_the_server_down():
    from edge_inspect.runtime.health import HealthServer
    from edge_inspect.runtime.metrics import RuntimeMetrics

    def broken(query):
        raise KeyError("boom")

    server = HealthServer(RuntimeMetrics().registry, lambda: {"ok": True}, port=0,
                          commands={"/ok": lambda q: (200, {"got": q}), "/broken": broken}).start()
    base = f"http://127.0.0.1:{server.port}"

    def call(path, method="POST", data=None):
        req = urllib.request.Request(base + path, method=method, data=data)
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    try:
        assert call("/ok?x=1") == (200, b'{"got": {"x": "1"}}\n')
        code, body = call("/broken")
        assert code == 500 and "KeyError" in json.loads(body)["error"]
        code, body = call("/nope")
        assert code == 404 and "/broken" in json.loads(body)["error"]
        assert call("/ok", data=b"x=1")[0] == 400  # parameters go in the query string
        assert call("/ok", method="GET")[0] == 405
        assert call("/healthz", method="GET") == (200, b"ok\n")  # still serving
    finally:
        server.stop()
