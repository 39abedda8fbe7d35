"""The model slot's per-camera state: initial values for a new camera, outputs carried to
the next frame of the same camera only, reset by a swap or a command."""

from pathlib import Path

import numpy as np

from edge_inspect.runtime.bundle import StateSpec, load_bundle
from edge_inspect.runtime.model_slot import ModelSlot

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "bundles" / "memory-schema1"


def _slot(reset=("reload", "sequence_restart", "command")) -> ModelSlot:
    bundle = load_bundle(FIXTURE)
    bundle.state = [StateSpec("protos", "state.protos", "state_out.protos", np.zeros(3, np.float32),
                              reset=tuple(reset))]
    return ModelSlot(bundle, engine=None, name="m")


def test_state_is_carried_per_camera_and_reset():
    slot = _slot()
    model = slot.current
    feeds = slot.state_feeds(model, ["a", "b"])
    np.testing.assert_array_equal(feeds["state.protos"], np.zeros((2, 3)))
    slot.keep_state(model, ["a"], {"state_out.protos": np.array([[1.0, 2.0, 3.0]])})
    feeds = slot.state_feeds(model, ["b", "a"])
    np.testing.assert_array_equal(feeds["state.protos"], [[0, 0, 0], [1, 2, 3]])  # b untouched
    slot.reset_state("a")
    np.testing.assert_array_equal(slot.state_feeds(model, ["a"])["state.protos"], [[0, 0, 0]])
    slot.keep_state(model, ["a"], {"state_out.protos": np.array([[4.0, 4.0, 4.0]])})
    old = slot.swap(model.bundle, None, "m2")
    assert old is model and slot.current.name == "m2"
    np.testing.assert_array_equal(slot.state_feeds(slot.current, ["a"])["state.protos"], [[0, 0, 0]])
    slot.keep_state(old, ["a"], {"state_out.protos": np.array([[9.0, 9.0, 9.0]])})  # a stale batch
    np.testing.assert_array_equal(slot.state_feeds(slot.current, ["a"])["state.protos"], [[0, 0, 0]])


def test_a_reset_rule_the_bundle_does_not_list_keeps_the_state():
    slot = _slot(reset=("reload",))
    model = slot.current
    slot.keep_state(model, ["a"], {"state_out.protos": np.array([[1.0, 1.0, 1.0]])})
    slot.reset_state("a", rule="command")
    np.testing.assert_array_equal(slot.state_feeds(model, ["a"])["state.protos"], [[1, 1, 1]])
    assert slot.state_feeds(_slot().current, ["a"])["state.protos"].shape == (1, 3)


def test_a_gated_state_moves_only_on_frames_scored_at_or_below_the_threshold():
    import dataclasses

    slot = _slot()
    bundle = slot.current.bundle
    bundle.state = [dataclasses.replace(bundle.state[0], gate="normal")]
    model = dataclasses.replace(slot.current, threshold=1.0)
    slot.current = model
    out = {bundle.score_output: np.array([0.5, 2.0, 1.0]),
           "state_out.protos": np.array([[1.0] * 3, [2.0] * 3, [3.0] * 3])}
    slot.keep_state(model, ["a", "b", "c"], out)
    feeds = slot.state_feeds(model, ["a", "b", "c"])["state.protos"]
    np.testing.assert_array_equal(feeds, [[1, 1, 1], [0, 0, 0], [3, 3, 3]])  # b's 2.0 > 1.0: kept out
    slot.keep_state(model, ["a"], {bundle.score_output: np.array([5.0]),
                                   "state_out.protos": np.array([[9.0] * 3])})
    np.testing.assert_array_equal(slot.state_feeds(model, ["a"])["state.protos"], [[1, 1, 1]])
    unthresholded = dataclasses.replace(model, threshold=None)  # no threshold: nothing is normal
    slot.current = unthresholded
    slot.keep_state(unthresholded, ["d"], {bundle.score_output: np.array([0.0]),
                                           "state_out.protos": np.array([[7.0] * 3])})
    np.testing.assert_array_equal(slot.state_feeds(unthresholded, ["d"])["state.protos"], [[0, 0, 0]])
    assert slot.reset_state("a", "command") is True
    assert _slot(reset=("reload",)).reset_state("a", "command") is False
