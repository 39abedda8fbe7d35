"""The MQTT sink against a local Mosquitto: results/s it takes and the broker acknowledges,
and what arrives when the broker restarts in the middle of a stream (QoS 1).

Two runs, one process, one broker (started here; Debian's ``mosquitto``):

* ``sustained``: ``--results`` results published as fast as the caller can (the pipeline's
  publish thread), QoS 1, one persistent subscriber; hand-over rate (publish calls/s) and
  the rate at which the broker acknowledged them and the subscriber received them;
* ``restart``: the same at ``--rate`` results/s with the broker stopped (SIGTERM) for
  ``--down-s`` seconds after a third of them; every seq the subscriber got, duplicates
  (QoS 1 is at least once) and losses (must be 0).

    .venv/bin/python benchmarks/mqtt_throughput.py [--results 20000] [--rate 200] [--down-s 2]

Writes benchmarks/results/mqtt_throughput.{json,md}. Rates depend on the machine; the
restart run's "lost 0" is the claim.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_inspect.runtime.metrics import RuntimeMetrics  # noqa: E402
from tests.runtime.test_mqtt import Broker, Subscriber, _outcome, _result, _sink  # noqa: E402

OUT = ROOT / "benchmarks" / "results"


def sustained(broker: Broker, n: int) -> dict:
    sub = Subscriber(broker.port, client_id="bench-sub-1")
    sub.wait(lambda: sub.client.is_connected(), 10)
    metrics = RuntimeMetrics()
    sink = _sink(broker.port, metrics, client_id="bench-1", queue=max(10000, n))
    sub.wait(lambda: sink.client.is_connected(), 10)
    t0 = time.perf_counter()
    for seq in range(n):
        sink.publish(_result("line1", seq))
    handed = time.perf_counter() - t0
    sub.wait(lambda: _outcome(metrics, "delivered") >= n, 120)
    acked = time.perf_counter() - t0
    sub.wait(lambda: len({m["seq"] for m in sub.messages}) >= n, 120)
    received = time.perf_counter() - t0
    out = {"results": n, "handover_per_s": n / handed, "acknowledged_per_s": n / acked,
           "received_per_s": n / received, "dropped": _outcome(metrics, "dropped"),
           "received_distinct": len({m["seq"] for m in sub.messages})}
    sink.close(), sub.close()
    return out


def restart(broker: Broker, n: int, rate: float, down_s: float) -> dict:
    sub = Subscriber(broker.port, client_id="bench-sub-2")
    sub.wait(lambda: sub.client.is_connected(), 10)
    metrics = RuntimeMetrics()
    sink = _sink(broker.port, metrics, client_id="bench-2")
    sub.wait(lambda: sink.client.is_connected(), 10)
    done = threading.Event()

    def bounce():
        broker.stop()
        time.sleep(down_s)
        broker.start()
        done.set()

    for seq in range(n):
        if seq == n // 3:
            threading.Thread(target=bounce, daemon=True).start()
        sink.publish(_result("line1", seq))
        time.sleep(1 / rate)
    done.wait(30)
    sub.wait(lambda: len({m["seq"] for m in sub.messages}) >= n, 60)
    got = {m["seq"] for m in sub.messages}
    out = {"results": n, "rate_per_s": rate, "broker_down_s": down_s, "received_distinct": len(got),
           "lost": n - len(got), "duplicates": len(sub.messages) - len(got),
           "dropped_by_sink": _outcome(metrics, "dropped")}
    sink.close(), sub.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=int, default=20000)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--down-s", type=float, default=2.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        broker = Broker(Path(tmp) / "broker")
        broker.start()
        try:
            report = {"machine": platform.platform(), "python": platform.python_version(),
                      "sustained": sustained(broker, args.results),
                      "restart": restart(broker, int(args.rate * 6), args.rate, args.down_s)}
        finally:
            broker.stop()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "mqtt_throughput.json").write_text(json.dumps(report, indent=2))
    s, r = report["sustained"], report["restart"]
    md = (f"# MQTT sink throughput (`benchmarks/mqtt_throughput.py`)\n\n"
          f"Machine: {report['machine']}, local Mosquitto, QoS 1, one subscriber.\n\n"
          f"| run | results | hand-over /s | acknowledged /s | received /s | dropped | lost |\n"
          f"|---|---|---|---|---|---|---|\n"
          f"| sustained | {s['results']} | {s['handover_per_s']:.0f} | {s['acknowledged_per_s']:.0f} | "
          f"{s['received_per_s']:.0f} | {s['dropped']:.0f} | {s['results'] - s['received_distinct']} |\n"
          f"| broker restart ({r['broker_down_s']} s down) at {r['rate_per_s']:.0f}/s | {r['results']} | "
          f"| | | {r['dropped_by_sink']:.0f} | {r['lost']} ({r['duplicates']} duplicates) |\n")
    (OUT / "mqtt_throughput.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
