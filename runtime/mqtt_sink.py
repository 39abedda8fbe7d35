"""Results to the plant's MQTT broker: one JSON message per scored frame (paho-mqtt).

Profile section::

    mqtt:
      host: broker.plant.local
      port: 1883
      topic: "edge-inspect/{camera}/result"   # {camera} and {model} are filled in
      qos: 1                                  # 0, 1 or 2
      retain: true                            # the broker keeps each camera's latest result
      client_id: edge-inspect-line1           # a fixed id: a QoS 1 session survives restarts
      username: null                          # password from the env var named by password_env
      password_env: null
      queue: 10000                            # messages held while the broker is away
      capture_ref: true                       # name the capture folder of an anomalous frame

Payload: ``{"camera", "seq", "time" (Unix seconds when published), "score", "label",
"threshold", "model", "bundle" (folder@manifest digest of the bundle that scored it),
"capture"?}``.

Never blocks the pipeline: ``publish`` hands the message to paho's own network thread
(``loop_start``), which connects asynchronously and reconnects with a backoff of 1 s
doubling to 30 s. While the broker is away, QoS 1/2 messages wait in paho's queue, bounded
by ``queue``; past it (and for QoS 0 while disconnected) a message is dropped and counted
in ``edge_inspect_sink_messages_total{sink="mqtt",outcome="dropped"}``; ``delivered``
counts the broker's acknowledgements, ``queued`` every hand-over. With a fixed
``client_id`` the session is persistent (``clean_session: false``), so QoS 1 messages
queued during a broker restart are sent once it is back.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass

from edge_inspect.runtime.logs import ThrottledLog

log = logging.getLogger(__name__)
OUTCOMES = ("queued", "delivered", "dropped")
INSTALL_HINT = "pip install 'edge-inspect[mqtt]' (paho-mqtt)"


@dataclass
class MqttSection:
    """The profile's ``mqtt`` section (see the module docstring)."""

    host: str = "127.0.0.1"
    port: int = 1883
    topic: str = "edge-inspect/{camera}/result"
    qos: int = 1
    retain: bool = True
    client_id: str | None = None
    username: str | None = None
    password_env: str | None = None
    keepalive: int = 30
    queue: int = 10000
    capture_ref: bool = True

    def check(self, where: str) -> MqttSection:
        import importlib.util

        from edge_inspect.runtime.profile import ProfileError

        if importlib.util.find_spec("paho") is None:
            raise ProfileError(f"{where}: the MQTT sink needs paho-mqtt: {INSTALL_HINT}")
        if self.qos not in (0, 1, 2) or isinstance(self.qos, bool):
            raise ProfileError(f"{where}.qos must be 0, 1 or 2, got {self.qos!r}")
        for key in ("port", "keepalive", "queue"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ProfileError(f"{where}.{key} must be a positive integer, got {value!r}")
        for key in ("retain", "capture_ref"):
            if not isinstance(getattr(self, key), bool):
                raise ProfileError(f"{where}.{key} must be true or false")
        try:
            self.topic.format(camera="c", model="m")
        except (KeyError, IndexError, ValueError, AttributeError):
            raise ProfileError(f"{where}.topic {self.topic!r} may use only {{camera}} and "
                               "{model}") from None
        if any(c in self.topic for c in "+#"):
            raise ProfileError(f"{where}.topic {self.topic!r}: + and # are subscription wildcards, "
                               "not allowed in a topic to publish to")
        if self.password_env and os.environ.get(self.password_env) is None:
            raise ProfileError(f"{where}.password_env names {self.password_env}, which is not set")
        return self


def payload(result) -> dict:
    """The message body of one result."""
    body = {"camera": result.camera, "seq": result.seq, "time": round(time.time(), 6),
            "score": result.score, "label": bool(result.label), "threshold": result.threshold,
            "model": result.model, "bundle": result.bundle or result.model}
    if getattr(result, "capture", None):
        body["capture"] = result.capture
    return body


class MqttSink:
    """A sink of the pipeline's publish stage (``publish(result)``, ``flush()``, ``close()``)."""

    def __init__(self, cfg: MqttSection, counter=None, connected_gauge=None) -> None:
        try:
            import paho.mqtt.client as mqtt
        except ImportError:
            raise ImportError(f"the mqtt section needs paho-mqtt: {INSTALL_HINT}") from None
        self.cfg, self.mqtt = cfg, mqtt
        self.counter, self.connected_gauge = counter, connected_gauge
        self.noisy = ThrottledLog(log, every_s=60.0)
        self.queued = self.delivered = self.dropped = 0
        self.lock = threading.Lock()  # publish runs on the pipeline's thread, acks on paho's
        persistent = cfg.client_id is not None
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cfg.client_id or "",
                                  clean_session=not persistent)
        self.client.max_queued_messages_set(cfg.queue)
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        if cfg.username:
            password = os.environ.get(cfg.password_env) if cfg.password_env else None
            self.client.username_pw_set(cfg.username, password)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.connect_async(cfg.host, cfg.port, keepalive=cfg.keepalive)
        self.client.loop_start()

    def _count(self, outcome: str) -> None:
        with self.lock:
            setattr(self, outcome, getattr(self, outcome) + 1)
        if self.counter is not None:
            self.counter.labels("mqtt", outcome).inc()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.noisy.warning("connect", "MQTT broker %s:%d refused the connection: %s",
                               self.cfg.host, self.cfg.port, reason_code)
            return
        log.info("MQTT connected to %s:%d", self.cfg.host, self.cfg.port)
        if self.connected_gauge is not None:
            self.connected_gauge.set(1)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self.connected_gauge is not None:
            self.connected_gauge.set(0)
        self.noisy.warning("disconnect", "MQTT broker %s:%d gone (%s); reconnecting with backoff, "
                           "QoS %d messages queue meanwhile (up to %d)", self.cfg.host, self.cfg.port,
                           reason_code, self.cfg.qos, self.cfg.queue)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self._count("delivered")

    def publish(self, result) -> None:
        topic = self.cfg.topic.format(camera=result.camera, model=result.model)
        fields = payload(result)
        if not self.cfg.capture_ref:
            fields.pop("capture", None)
        body = json.dumps(fields)
        try:
            info = self.client.publish(topic, body, qos=self.cfg.qos, retain=self.cfg.retain)
        except ValueError as exc:  # e.g. a model name with + or # made the topic invalid
            self._count("dropped")
            self.noisy.warning("topic", "MQTT result of %s not published: %s (topic %r)", result.camera,
                               exc, topic)
            return
        # QoS 1/2 while disconnected: paho keeps the message and sends it after reconnecting
        if info.rc == self.mqtt.MQTT_ERR_SUCCESS or (info.rc == self.mqtt.MQTT_ERR_NO_CONN and self.cfg.qos):
            self._count("queued")
            return
        self._count("dropped")
        self.noisy.warning("drop", "MQTT result of %s seq %d dropped (%s): the broker is away and "
                           "the queue of %d is full, or QoS 0 while disconnected", result.camera,
                           result.seq, self.mqtt.error_string(info.rc), self.cfg.queue)

    def flush(self, timeout_s: float = 2.0) -> None:
        """Give queued messages up to ``timeout_s`` to be acknowledged (at shutdown)."""
        deadline = time.monotonic() + timeout_s
        while (self.cfg.qos and time.monotonic() < deadline and self.client.is_connected()
               and self.pending()):  # QoS 0 is never acknowledged: nothing to wait for
            time.sleep(0.02)

    def pending(self) -> int:
        """Messages handed to paho and not yet acknowledged by the broker."""
        with self.lock:
            return self.queued - self.delivered

    def close(self) -> None:
        self.flush()
        self.client.disconnect()
        self.client.loop_stop()
