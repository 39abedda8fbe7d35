"""The body of one camera process: build its source and publish frames until it ends.

One process per camera keeps OpenCV decoding and file reading out of the inference loop
(and a decoder crash out of the pipeline's process); the orchestrator's supervisor
restarts a process that dies.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

from edge_inspect.runtime.source_registry import make_source
from edge_inspect.runtime.sources import publish
from edge_inspect.runtime.transport.sockets import Sender, TransportConfig

log = logging.getLogger(__name__)
SUBSCRIBER_LOG_S = 5.0  # a live source waiting this long for its subscriber says so


def camera_process(cam: dict, endpoint: str, mode: str) -> None:
    """Publish frames until the source ends or SIGTERM arrives.

    The stop flag is local to the process (set by the SIGTERM handler): a shared
    multiprocessing Event would deadlock its ``set()`` if a sibling was SIGKILLed while
    waiting on it.
    """
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides
    sender = Sender(TransportConfig(endpoint, mode=mode, send_timeout_ms=1000), await_subscribers=True)
    t0, logged = time.monotonic(), False
    while not sender.wait_for_subscriber(100):  # live: frame 0 only once the pipeline listens
        if stop.is_set():
            sender.close(linger_ms=0)
            return
        if not logged and time.monotonic() - t0 > SUBSCRIBER_LOG_S:
            log.warning("camera %s: no subscriber on %s yet; waiting", cam["id"], endpoint)
            logged = True
    try:
        publish(make_source(cam, stop), sender, cam["id"], stop)
    except TimeoutError:
        pass  # every_part and the pipeline went away: nothing more to do
    finally:
        # a finished source delivers what is queued (the context waits for it: the process
        # ends with os._exit, which would otherwise drop ZeroMQ's queue); a stopped one leaves
        sender.close(linger_ms=0 if stop.is_set() else None)
        sender.ctx.term()
