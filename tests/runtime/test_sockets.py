"""Delivery modes and CURVE over real ZeroMQ sockets (ipc in a temp folder, tcp loopback)."""

import threading
import time

import numpy as np
import pytest
import zmq

from edge_inspect.runtime.transport.sockets import Receiver, Sender, TransportConfig
from edge_inspect.runtime.transport.wire import decode, encode


@pytest.fixture()
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def _frame(seq):
    return encode("frame", "cam0", seq, time.monotonic_ns(), [np.full((8, 8, 3), seq % 256, np.uint8)])


def test_every_part_slow_consumer_loses_nothing(ctx, tmp_path):
    cfg = TransportConfig(f"ipc://{tmp_path}/ep", mode="every_part", hwm=4)
    rx, tx = Receiver(cfg, ctx), Sender(cfg, ctx)
    n, got = 60, []

    def consume():
        while len(got) < n:
            parts = rx.recv(2000)
            if parts is None:
                break
            got.append(decode(parts).seq)
            time.sleep(0.005)  # slower than the sender

    t = threading.Thread(target=consume)
    t.start()
    t0 = time.perf_counter()
    for seq in range(n):
        assert tx.send(_frame(seq))  # blocks while the consumer is behind: backpressure
    t.join(10)
    assert got == list(range(n))
    assert time.perf_counter() - t0 > n * 0.005 * 0.5  # the sender was held back
    rx.close(), tx.close()


def test_live_mode_keeps_the_newest_and_counts_drops(ctx, tmp_path):
    cfg = TransportConfig(f"ipc://{tmp_path}/live", mode="live", hwm=2)
    rx, tx = Receiver(cfg, ctx), Sender(cfg, ctx)
    time.sleep(0.2)  # PUB/SUB: let the subscription arrive
    sent = sum(tx.send(_frame(seq)) for seq in range(50))
    time.sleep(0.2)
    msgs = [decode(p) for p in rx.drain(1000)]
    seqs = [m.seq for m in msgs]
    assert seqs and seqs == sorted(seqs) and seqs[-1] < 50
    assert len(seqs) <= 2 * 2 + 1  # tiny queues: most frames never wait
    dropped = 50 - len(seqs)  # gaps in seq are the drops a consumer counts
    assert dropped >= 40 and sent >= len(seqs)
    rx.close(), tx.close()


def test_curve_rejects_a_client_without_the_right_key(ctx):
    server_public, server_secret = zmq.curve_keypair()
    good_public, good_secret = zmq.curve_keypair()
    bad_public, bad_secret = zmq.curve_keypair()
    rx = Receiver(TransportConfig("tcp://127.0.0.1:*", mode="every_part",
                                  curve_server_secret=server_secret, curve_server_public=server_public,
                                  curve_client_keys=[good_public]), ctx)
    endpoint = rx.socket.getsockopt(zmq.LAST_ENDPOINT).decode()  # the port the OS chose
    for public, secret, expect in ((bad_public, bad_secret, False), (good_public, good_secret, True)):
        tx = Sender(TransportConfig(endpoint, mode="every_part", send_timeout_ms=300,
                                    curve_server_public=server_public, curve_client_public=public,
                                    curve_client_secret=secret), ctx)
        try:
            tx.send(_frame(1))
        except TimeoutError:
            pass  # no accepted connection to push to
        parts = rx.recv(1000)
        assert (parts is not None) == expect
        tx.close()
    rx.close()
    from edge_inspect.runtime.transport.sockets import stop_authenticators

    stop_authenticators()


def test_config_errors():
    with pytest.raises(ValueError, match="mode"):
        TransportConfig("ipc:///tmp/x", mode="fast")
    with pytest.raises(ValueError, match="endpoint"):
        TransportConfig("http://localhost:1")


def test_live_sender_waits_for_its_first_subscriber_and_then_loses_nothing(ctx, tmp_path):
    cfg = TransportConfig(f"ipc://{tmp_path}/live", mode="live", hwm=100)
    tx = Sender(cfg, ctx, await_subscribers=True)
    t0 = time.monotonic()
    assert not tx.wait_for_subscriber(200)  # nobody listens yet
    assert time.monotonic() - t0 >= 0.15
    rx = Receiver(cfg, ctx)
    assert tx.wait_for_subscriber(5000)
    for seq in range(20):  # sent right away: no "slow joiner" sleep
        tx.send(_frame(seq))
    got = [decode(p).seq for p in iter(lambda: rx.recv(1000), None)]
    assert got == list(range(20))
    assert Sender(TransportConfig(f"ipc://{tmp_path}/ep", mode="every_part"), ctx).wait_for_subscriber(0)
    with pytest.raises(ValueError, match="await_subscribers"):
        Sender(TransportConfig(f"ipc://{tmp_path}/plain", mode="live"), ctx).wait_for_subscriber(0)


def test_wait_connected_says_when_the_publisher_is_there(ctx, tmp_path):
    """False while nothing is bound; True once the handshake is done, after which the
    subscription reaches the PUB within moments (the demo waits so before its cameras start,
    a process start later)."""
    cfg = TransportConfig(f"ipc://{tmp_path}/results", mode="live", hwm=100)
    rx = Receiver(cfg, ctx, await_connection=True)
    assert rx.wait_connected(200) is False  # nothing bound yet
    rx.close()
    tx = Sender(cfg, ctx)
    for attempt in range(10):
        rx = Receiver(cfg, ctx, await_connection=True)
        assert rx.wait_connected(5000)
        deadline, parts = time.monotonic() + 2.0, None
        while parts is None and time.monotonic() < deadline:
            assert tx.send(_frame(attempt))
            parts = rx.recv(5)
        assert parts is not None and decode(parts).seq == attempt
        rx.close()
    tx.close()


def test_await_connection_needs_a_connecting_receiver(ctx, tmp_path):
    with pytest.raises(ValueError, match="binding receiver cannot also connect or await"):
        Receiver(TransportConfig(f"ipc://{tmp_path}/ep", mode="every_part"), ctx, await_connection=True)
    rx = Receiver(TransportConfig(f"ipc://{tmp_path}/live", mode="live"), ctx)
    with pytest.raises(ValueError, match="await_connection=True"):
        rx.wait_connected(10)
    rx.close()


def test_wait_connected_stops_watching_once_connected(ctx, tmp_path):
    """Later reconnects queue no monitor events (a long-lived listener must not grow)."""
    cfg = TransportConfig(f"ipc://{tmp_path}/results", mode="live")
    tx = Sender(cfg, ctx)
    rx = Receiver(cfg, ctx, await_connection=True)
    assert rx.wait_connected(5000) and rx.handshakes is None
    assert rx.wait_connected(0)  # still connected: says so without a monitor
    rx.close(), tx.close()
