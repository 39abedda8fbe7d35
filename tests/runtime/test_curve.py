"""Authenticated tcp from the profile (issue 12): `edge-inspect keys` makes the pairs, the
runtime accepts frames only from listed client keys and serves results only to them."""

import socket
import time

import numpy as np
import pytest

from edge_inspect.runtime.cli import main
from edge_inspect.runtime.keys import load_keypair, load_public_key
from edge_inspect.runtime.profile import ProfileError
from edge_inspect.runtime.transport.sockets import Receiver, Sender, TransportConfig
from edge_inspect.runtime.transport.wire import decode, encode
from tests.runtime.serve_proc import Serve


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _send(endpoint, n, keys=None):
    """Frames as camera `line7`; how many the link took (a keyless client's handshake fails,
    so nothing is ever delivered and sends time out)."""
    tx = Sender(TransportConfig(endpoint, mode="every_part", send_timeout_ms=300, **(keys or {})))
    taken = 0
    for seq in range(n):
        try:
            tx.send(encode("frame", "line7", seq, time.monotonic_ns(), [np.zeros((250, 250, 3), np.uint8)]))
            taken += 1
        except TimeoutError:
            pass
    time.sleep(0.5)
    tx.close(linger_ms=0)
    return taken


def _client(keys_dir, name, server):
    public, secret = load_keypair(keys_dir / f"{name}.key_secret", "key")
    return {"curve_server_public": server, "curve_client_public": public, "curve_client_secret": secret}


def test_keys_command_writes_a_pair_and_never_overwrites(tmp_path, capsys):
    assert main(["keys", "--out", str(tmp_path / "keys"), "--name", "server"]) == 0
    public, secret = tmp_path / "keys" / "server.key", tmp_path / "keys" / "server.key_secret"
    assert load_keypair(secret, "key")[0] == load_public_key(public)
    assert oct(secret.stat().st_mode & 0o777) == "0o600"
    assert "security" in capsys.readouterr().out
    assert main(["keys", "--out", str(tmp_path / "keys"), "--name", "server"]) == 2
    assert "exists; keys are never overwritten" in capsys.readouterr().err


def test_only_listed_clients_get_frames_in_and_results_out(bundles, tmp_path):
    keys = tmp_path / "keys"
    for out, name in ((keys, "server"), (keys / "clients", "line7"), (keys / "clients", "viewer"),
                      (tmp_path / "strangers", "mallory")):
        assert main(["keys", "--out", str(out), "--name", name]) == 0
    frames, results = f"tcp://127.0.0.1:{_free_port()}", f"tcp://127.0.0.1:{_free_port()}"
    profile = {"bundle": str(bundles["memory"]), "mode": "every_part", "endpoint_dir": str(tmp_path / "ep"),
               "frames": frames, "results": results, "model_name": "m",
               "cameras": [{"id": "line7", "source": "external"},  # a remote sender
                           {"id": "local", "source": "synthetic", "size": [250, 250], "fps": 10}],
               "http": {"host": "127.0.0.1", "port": 0},
               "security": {"server_key": str(keys / "server.key_secret"),
                            "client_keys": str(keys / "clients")}}
    serve = Serve(profile, tmp_path).started()
    server = load_public_key(keys / "server.key")
    viewer = Receiver(TransportConfig(results, mode="live", hwm=1000,
                                      **_client(keys / "clients", "viewer", server)))
    keyless_viewer = Receiver(TransportConfig(results, mode="live", hwm=1000))
    scored = lambda: serve.value("edge_inspect_frames_inferred_total", camera="line7", model="m")  # noqa: E731
    try:
        _send(frames, 5)  # no keys: used to be 5 of 5 scored
        _send(frames, 5, _client(tmp_path / "strangers", "mallory", server))  # a key not listed
        time.sleep(1.0)
        assert scored() == 0
        assert _send(frames, 5, _client(keys / "clients", "line7", server)) == 5
        deadline = time.monotonic() + 20
        while scored() < 5:
            assert time.monotonic() < deadline, "the keyed client's frames were not scored"
            time.sleep(0.1)
        assert scored() == 5
        got, until = set(), time.monotonic() + 5
        while got != {"line7", "local"} and time.monotonic() < until:  # results keep coming: bounded
            parts = viewer.recv(200)
            if parts is not None:
                got.add(decode(parts).camera)
        assert got == {"line7", "local"}  # the listed viewer reads results
        # the runtime's own camera process gets in with the key pair made at start (frames and
        # results accept different clients: one ZAP domain per socket)
        assert serve.value("edge_inspect_frames_inferred_total", camera="local", model="m") > 0
        assert keyless_viewer.recv(200) is None  # an unlisted one reads nothing
    finally:
        viewer.close(), keyless_viewer.close()
        assert serve.stop() == 0


def test_security_section_errors_name_the_fix(tmp_path):
    from edge_inspect.runtime.profile import Profile

    base = {"bundle": "b", "cameras": [{"id": "a", "source": "synthetic"}]}
    with pytest.raises(ProfileError, match="needs server_key .* and client_keys"):
        Profile.from_dict({**base, "security": {"server_key": "k"}})
    with pytest.raises(ProfileError, match="need mode: every_part"):
        Profile.from_dict({**base, "cameras": [{"id": "a", "source": "external"}]})
    with pytest.raises(ProfileError, match="needs a port"):
        Profile.from_dict({**base, "frames": "tcp://127.0.0.1"})
    with pytest.raises(ProfileError, match="reachable from other machines .* add a security section"):
        Profile.from_dict({**base, "mode": "every_part", "frames": "tcp://0.0.0.0:5555"})
    from edge_inspect.runtime.keys import load_server_keys

    with pytest.raises(FileNotFoundError, match="edge-inspect keys"):
        load_server_keys(tmp_path / "server.key_secret", tmp_path)
    main(["keys", "--out", str(tmp_path), "--name", "server"])
    (tmp_path / "clients").mkdir()
    with pytest.raises(ValueError, match="holds no \\*.key files"):
        load_server_keys(tmp_path / "server.key_secret", tmp_path / "clients")
    with pytest.raises(ValueError, match="holds only a public key"):
        load_server_keys(tmp_path / "server.key", tmp_path / "clients")
