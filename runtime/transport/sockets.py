"""ZeroMQ sockets for the two delivery modes, with every option set explicitly.

* ``live`` -- latest frame wins: PUB (sender, binds; an XPUB for a camera, so it can wait
  for its first subscriber, :meth:`Sender.wait_for_subscriber`) / SUB (receiver, connects)
  with tiny high-water marks;
  the receiver drains its queue without blocking and keeps only the newest message per
  camera (:meth:`Receiver.drain`), counting what it skipped as drops
  (``reason="stale"``); ZeroMQ's own HWM drops show up as ``seq`` gaps (``reason="hwm"``).
* ``every_part`` -- nothing lost: PUSH (sender, connects) / PULL (receiver, binds) with
  ``IMMEDIATE`` and a bounded HWM, so a slow consumer blocks the sender (backpressure)
  instead of dropping.

Endpoints are ``ipc://`` or ``tcp://`` (loopback by default in configs). tcp endpoints can
require CURVE: the binding side holds a server key pair and accepts only the listed client
public keys (a ZAP handler in a thread); a client without an accepted key gets nothing
through. LINGER is bounded so shutdown never hangs; receive timeouts let callers run stall
watchdogs; ``max_message_bytes`` (``MAXMSGSIZE``) bounds what a receiver reads into memory.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import zmq

MODES = ("live", "every_part")


@dataclass
class TransportConfig:
    """Socket options for one link (all explicit: ZeroMQ's defaults are unbounded)."""

    endpoint: str
    mode: str = "live"
    binder: str | None = None  # "sender" or "receiver"; None: the mode's default (see below)
    hwm: int | None = None  # None: 2 for live, 50 for every_part
    linger_ms: int | None = None  # None: 100 ms live; every_part waits up to send_timeout_ms
    #                               so frames still queued at close are delivered
    recv_timeout_ms: int = 500
    send_timeout_ms: int = 5000  # every_part: how long a blocked send waits before failing
    max_message_bytes: int | None = None  # receiving side: larger parts disconnect their sender
    curve_server_secret: bytes | None = None  # binding side (z85 secret key)
    curve_server_public: bytes | None = None
    curve_client_keys: list[bytes] = field(default_factory=list)  # accepted client public keys
    curve_client_secret: bytes | None = None  # connecting side
    curve_client_public: bytes | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"transport mode {self.mode!r} unknown; choose one of {MODES}")
        if not self.endpoint.startswith(("ipc://", "tcp://", "inproc://")):
            raise ValueError(f"endpoint {self.endpoint!r} must start with ipc://, tcp:// or inproc://")
        if self.binder not in (None, "sender", "receiver"):
            raise ValueError(f"binder must be 'sender' or 'receiver', got {self.binder!r}")

    @property
    def receiver_binds(self) -> bool:
        """live: each source's PUB binds, subscribers connect (a bound SUB does not reliably
        get its subscription to connecting publishers); every_part: the pipeline's PULL
        binds and any number of sources connect (fan-in)."""
        if self.binder is not None:
            return self.binder == "receiver"
        return self.mode == "every_part"

    @property
    def high_water_mark(self) -> int:
        return self.hwm if self.hwm is not None else (2 if self.mode == "live" else 50)


_AUTH = {}
_DOMAINS = itertools.count()


def _start_authenticator(ctx: zmq.Context, client_keys: list[bytes]) -> str:
    """A ZAP domain of its own for one binding socket, accepting ``client_keys`` (one domain
    per socket: frames and results of one runtime accept different clients)."""
    from zmq.auth.thread import ThreadAuthenticator

    auth = _AUTH.get(id(ctx))
    if auth is None:
        auth = ThreadAuthenticator(ctx)
        auth.start()
        _AUTH[id(ctx)] = auth
    domain = f"edge-inspect-{next(_DOMAINS)}"
    auth.configure_curve_callback(domain, credentials_provider=_Allowed(client_keys))
    return domain


class _Allowed:
    def __init__(self, keys: list[bytes]) -> None:
        self.keys = {bytes(k) for k in keys}

    def callback(self, domain: str, key: bytes) -> bool:
        import zmq.utils.z85 as z85

        return z85.encode(key) in self.keys or key in self.keys


def stop_authenticators() -> None:
    for auth in _AUTH.values():
        auth.stop()
    _AUTH.clear()


def _socket(ctx: zmq.Context, kind: int, cfg: TransportConfig, bind: bool) -> zmq.Socket:
    sock = _configured(ctx, kind, cfg, bind)
    _attach(sock, cfg, bind)
    return sock


def _configured(ctx: zmq.Context, kind: int, cfg: TransportConfig, bind: bool) -> zmq.Socket:
    """A socket with every option of ``cfg`` set, not yet bound or connected."""
    sock = ctx.socket(kind)
    linger = cfg.linger_ms if cfg.linger_ms is not None else (
        100 if cfg.mode == "live" else cfg.send_timeout_ms)
    sock.setsockopt(zmq.LINGER, linger)
    sock.setsockopt(zmq.SNDHWM, cfg.high_water_mark)
    sock.setsockopt(zmq.RCVHWM, cfg.high_water_mark)
    sock.setsockopt(zmq.RCVTIMEO, cfg.recv_timeout_ms)
    sock.setsockopt(zmq.SNDTIMEO, cfg.send_timeout_ms if cfg.mode == "every_part" else 0)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
    if cfg.max_message_bytes is not None and kind in (zmq.SUB, zmq.PULL):
        sock.setsockopt(zmq.MAXMSGSIZE, cfg.max_message_bytes)  # never read into memory
    if kind == zmq.PUSH:
        sock.setsockopt(zmq.IMMEDIATE, 1)
    if bind and cfg.curve_server_secret:
        sock.zap_domain = _start_authenticator(ctx, cfg.curve_client_keys).encode()
        sock.curve_secretkey = cfg.curve_server_secret
        sock.curve_publickey = cfg.curve_server_public
        sock.curve_server = True
    elif not bind and cfg.curve_server_public:
        if not (cfg.curve_client_secret and cfg.curve_client_public):
            raise ValueError("a CURVE server key is set: the connecting side needs its own key pair")
        sock.curve_secretkey = cfg.curve_client_secret
        sock.curve_publickey = cfg.curve_client_public
        sock.curve_serverkey = cfg.curve_server_public
    return sock


def _attach(sock: zmq.Socket, cfg: TransportConfig, bind: bool) -> None:
    if bind:
        sock.bind(cfg.endpoint)
    else:
        sock.connect(cfg.endpoint)


class Sender:
    """Sends multipart messages; in live mode a full queue drops (counted by the receiver)."""

    def __init__(self, cfg: TransportConfig, ctx: zmq.Context | None = None,
                 await_subscribers: bool = False) -> None:
        """``await_subscribers`` (live): an XPUB, for :meth:`wait_for_subscriber`; without it
        a plain PUB, which keeps no subscription notices for nobody to read."""
        self.cfg = cfg
        self.ctx = ctx or zmq.Context.instance()
        self.await_subscribers = await_subscribers
        if cfg.mode == "live":
            kind = zmq.XPUB if await_subscribers else zmq.PUB
        else:
            kind = zmq.PUSH
        self.socket = _socket(self.ctx, kind, cfg, bind=not cfg.receiver_binds)

    def wait_for_subscriber(self, timeout_ms: int) -> bool:
        """live: True once a subscriber's subscription has arrived, False after the timeout.

        ZeroMQ's "slow joiner": a PUB silently drops what it sends before a subscription
        reaches it, so a source waits here before its first frame (a guess like "sleep
        0.3 s" loses frames on a loaded machine). every_part: always True (PUSH with
        ``IMMEDIATE`` holds messages until a peer is connected).
        """
        if self.cfg.mode != "live":
            return True
        if not self.await_subscribers:
            raise ValueError("wait_for_subscriber needs a Sender made with await_subscribers=True")
        if self.socket.poll(timeout_ms, zmq.POLLIN):
            self.socket.recv(zmq.NOBLOCK)  # b"\x01" + topic prefix
            return True
        return False

    def send(self, parts: list) -> bool:
        """True when queued; False when live mode dropped it. every_part raises on timeout."""
        try:
            self.socket.send_multipart(parts, copy=False, flags=zmq.NOBLOCK if self.cfg.mode == "live" else 0)
            return True
        except zmq.Again:
            if self.cfg.mode == "live":
                return False
            raise TimeoutError(f"no receiver took a message on {self.cfg.endpoint} within "
                               f"{self.cfg.send_timeout_ms} ms") from None

    def close(self, linger_ms: int | None = None) -> None:
        """Close; queued messages get the configured LINGER (or ``linger_ms``) to leave."""
        self.socket.close(linger=linger_ms)


class Receiver:
    """Receives multipart messages (raw parts; decode with :func:`runtime.transport.wire.decode`)."""

    def __init__(self, cfg: TransportConfig, ctx: zmq.Context | None = None,
                 topics: list[bytes] = (b"",), also_connect: list[str] = (),
                 await_connection: bool = False) -> None:
        """``also_connect``: further endpoints a connecting receiver dials (live mode: one
        bound PUB per camera, all read by one SUB). ``await_connection``: watch the
        handshakes, for :meth:`wait_connected`."""
        self.cfg = cfg
        self.ctx = ctx or zmq.Context.instance()
        kind = zmq.SUB if cfg.mode == "live" else zmq.PULL
        if (also_connect or await_connection) and cfg.receiver_binds:
            raise ValueError("a binding receiver cannot also connect or await a connection; "
                             "list one endpoint")
        self.socket = _configured(self.ctx, kind, cfg, bind=cfg.receiver_binds)
        # watched from before the connect: a handshake done first would be missed
        self.handshakes = (self.socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
                           if await_connection else None)
        self.connected = False
        _attach(self.socket, cfg, bind=cfg.receiver_binds)
        for endpoint in also_connect:
            self.socket.connect(endpoint)
        if kind == zmq.SUB:
            for t in topics:
                self.socket.setsockopt(zmq.SUBSCRIBE, t)

    def wait_connected(self, timeout_ms: int) -> bool:
        """True once the sender at the endpoint has completed a handshake with this receiver
        and the subscription is sent, False after the timeout.

        A SUB that dials before its PUB binds retries with a growing back-off (up to
        ``RECONNECT_IVL_MAX``, 5 s) and misses what is published meanwhile: a listener that
        needs the first results (the demo) dials the bound endpoint and waits here before the
        cameras start. The PUB holds the subscription a moment after this returns (one hop
        over the endpoint), long before a camera process has started.
        """
        if self.handshakes is None:
            if self.connected:
                return True
            raise ValueError("wait_connected needs a Receiver made with await_connection=True")
        if not self.handshakes.poll(timeout_ms):
            return False
        self.socket.getsockopt(zmq.EVENTS)  # runs the socket's commands: the new pipe gets the subscription
        self._stop_watching()  # later reconnects would queue events nobody reads
        self.connected = True
        return True

    def _stop_watching(self) -> None:
        if self.handshakes is not None:
            if not self.socket.closed:
                self.socket.disable_monitor()
            self.handshakes.close(linger=0)
            self.handshakes = None

    def recv(self, timeout_ms: int | None = None) -> list | None:
        """One message's parts, or None after the timeout."""
        if self.socket.poll(self.cfg.recv_timeout_ms if timeout_ms is None else timeout_ms):
            return self.socket.recv_multipart(copy=False)
        return None

    def drain(self, timeout_ms: int | None = None, limit: int = 1000) -> list[list]:
        """Everything queued now (waiting up to the timeout for the first message).

        Live-mode consumers keep the newest message per camera and count the rest as
        ``stale`` drops; a message-count ``limit`` bounds one call.
        """
        first = self.recv(timeout_ms)
        if first is None:
            return []
        out = [first]
        while len(out) < limit:
            try:
                out.append(self.socket.recv_multipart(copy=False, flags=zmq.NOBLOCK))
            except zmq.Again:
                break
        return out

    def close(self) -> None:
        self._stop_watching()
        self.socket.close()
