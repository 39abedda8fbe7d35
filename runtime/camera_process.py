"""The body of one camera process: build its source and publish frames until it ends.

One process per camera keeps OpenCV decoding and file reading out of the inference loop
(and a decoder crash out of the pipeline's process); the orchestrator's supervisor
restarts a process that dies. A camera process never outlives the runtime: the kernel
kills it when its parent dies (``PR_SET_PDEATHSIG`` on Linux) and a watchdog thread checks
the parent's pid as a fallback (other systems, or a parent that died before the call).

Exit codes: 0 -- the source ended (a replay or file reached its end); :data:`EXIT_GAVE_UP`
-- a live source gave up (``max_reconnects``); anything else is a crash and is restarted.
Events a camera cannot report in a frame (an unreadable image, an oversized frame, a send
that blocked) are counted in a shared array (:class:`SourceEvents`) the runtime publishes
as ``edge_inspect_source_events_total{camera,event}``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time

from edge_inspect.runtime.source_registry import make_source
from edge_inspect.runtime.sources import publish
from edge_inspect.runtime.transport.shm_frames import PayloadFrames, RingFrames
from edge_inspect.runtime.transport.sockets import Sender, TransportConfig, stop_authenticators

log = logging.getLogger(__name__)
SUBSCRIBER_LOG_S = 5.0  # a live source waiting this long for its subscriber says so
EXIT_GAVE_UP = 75  # EX_TEMPFAIL: the source stopped trying; not a crash, not restarted
PARENT_CHECK_S = 0.5
SOURCE_EVENTS = ("unreadable_image", "oversized_frame", "send_blocked")


class SourceEvents:
    """Per-event counters in shared memory, written by the camera process, read by the runtime.

    A ``RawArray`` needs no lock (one writer) and no semaphore (so nothing for the
    multiprocessing resource tracker to track); it survives restarts of the camera process.
    """

    def __init__(self, mp_context) -> None:
        self.array = mp_context.RawArray("q", len(SOURCE_EVENTS))
        # frames the last sequence sent when its source ended by itself; -1: not ended
        self.finished_frames = mp_context.RawValue("q", -1)

    def count(self, event: str) -> None:
        self.array[SOURCE_EVENTS.index(event)] += 1

    def counts(self) -> dict[str, int]:
        return dict(zip(SOURCE_EVENTS, self.array[:], strict=True))


def die_with_parent(parent_pid: int) -> None:
    """Be killed when ``parent_pid`` dies, however it dies (even ``kill -9``)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass  # the watchdog below still works
    if os.getppid() != parent_pid:  # the parent died before the call above
        os._exit(1)

    def watchdog() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_CHECK_S)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watchdog, name="parent-watchdog", daemon=True).start()


def camera_process(cam: dict, endpoint: str, mode: str, parent_pid: int | None = None,
                   events: SourceEvents | None = None, max_frame_bytes: int | None = None,
                   transport: dict | None = None, ring: str | None = None,
                   planes: tuple[str, ...] | None = None) -> None:
    """Publish frames until the source ends or SIGTERM arrives.

    The stop flag is local to the process (set by the SIGTERM handler): a shared
    multiprocessing Event would deadlock its ``set()`` if a sibling was SIGKILLed while
    waiting on it. ``transport``: further :class:`TransportConfig` fields (CURVE keys).
    ``ring``: the shared-memory ring (made by the runtime) the frames go into, of which
    only ``planes`` (the ones the bundle reads); None: the pixels travel in the messages.
    """
    if parent_pid is not None:
        die_with_parent(parent_pid)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    on_event = events.count if events is not None else None
    sender = Sender(TransportConfig(endpoint, mode=mode, send_timeout_ms=1000, **(transport or {})),
                    await_subscribers=True)
    t0, logged = time.monotonic(), False
    while not sender.wait_for_subscriber(100):  # live: frame 0 only once the pipeline listens
        if stop.is_set():
            sender.close(linger_ms=0)
            return
        if not logged and time.monotonic() - t0 > SUBSCRIBER_LOG_S:
            log.warning("camera %s: no subscriber on %s yet; waiting", cam["id"], endpoint)
            logged = True
    source = make_source(cam, stop)
    source.on_event = on_event
    frames = RingFrames(ring, mode, planes, stop=stop) if ring else PayloadFrames(max_frame_bytes)
    try:
        sent = publish(source, sender, cam["id"], stop, on_event=on_event, frames=frames)
        if events is not None and not stop.is_set():  # the pipeline counts the tail it never got
            events.finished_frames.value = sent
    finally:
        # a finished source delivers what is queued (the context waits for it: the process
        # ends with os._exit, which would otherwise drop ZeroMQ's queue); a stopped one leaves
        sender.close(linger_ms=0 if stop.is_set() else -1)  # -1: until delivered (or SIGKILL)
        stop_authenticators()  # a live tcp camera's ZAP thread holds a socket: term() would hang
        sender.ctx.term()
        frames.close()
    if getattr(source, "gave_up", False):
        sys.exit(EXIT_GAVE_UP)
