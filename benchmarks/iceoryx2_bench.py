"""iceoryx2 publish-subscribe (zero-copy loan) vs the shared-memory ring vs a numpy copy (issue 18).

For 1080p and 4K RGB uint8 frames from 8 rotating sources (out of cache), in one run:

* ``numpy copy``: the ceiling, memory bandwidth (``transport_bench.bench_copy``);
* ``shm ring``: ``transport_bench.bench_shm``, the runtime's ``transport: shm`` code in
  every_part (an 8-slot ring, the writer waiting for a free slot, the reference message over
  ZeroMQ, the reader viewing in place and handing the slot back);
* ``iceoryx2 poll``: a publisher process loans a ``Slice[c_uint8]`` sample of the frame's
  size, copies the frame into it (the same one copy the ring's writer makes), stamps a
  ``FrameHeader`` user header (send time, sequence, shape, dtype) and sends; the subscriber
  here busy-polls ``receive()``, views the payload in place as numpy, reads one byte,
  records the latency and releases the sample;
* ``iceoryx2 event``: the same, but the subscriber sleeps on an iceoryx2 event service
  (the publisher notifies after each send) instead of spinning: the way a pipeline that
  must not burn a core would use it.

No sample may be lost (every_part): subscriber buffer 8, ``enable_safe_overflow(False)``
and ``BackpressureStrategy.RetryUntilDelivered``, so a publisher blocks in ``send()`` while
the buffer is full. ``send()`` returning 0 receivers is counted as ``dropped``.

GB/s = frame bytes received per second of the run; one-way latency = monotonic time at the
receiver minus the sender's stamp taken just before it loans and fills the sample (the
ring's writer stamps just before ``ring.write``). A last part kills the publisher with
SIGKILL mid-run (and then publisher and subscriber together) and lists what iceoryx2
leaves in /dev/shm and its root path (/tmp/iceoryx2).

Needs an interpreter with iceoryx2 (not a project dependency)::

    python -m venv /tmp/ice-venv && /tmp/ice-venv/bin/pip install iceoryx2 numpy pyzmq
    /tmp/ice-venv/bin/python benchmarks/iceoryx2_bench.py [--frames 400]

(``edge_inspect`` must be importable: ``pip install -e . --no-deps`` or a path to it.)
Writes benchmarks/results/iceoryx2_bench.{json,md}.
"""

from __future__ import annotations

import argparse
import ctypes
import faulthandler
import gc
import json
import multiprocessing as mp
import os
import platform
import signal
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transport_bench import SIZES, SOURCES, _sources, _stats, bench_copy, bench_shm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
BUFFER = 8  # subscriber buffer: as many frames in flight as the ring has slots
SHM_DIR = Path("/dev/shm")
COMMAND = "/tmp/ice-venv/bin/python benchmarks/iceoryx2_bench.py --frames {frames}"


class FrameHeader(ctypes.Structure):
    """The user header: how a subscriber learns the frame's metadata (fixed size, typed)."""

    _fields_ = [("t_ns", ctypes.c_int64), ("seq", ctypes.c_uint64), ("ndim", ctypes.c_uint32),
                ("shape", ctypes.c_uint32 * 4), ("dtype", ctypes.c_char * 8)]


def _iox2():
    import iceoryx2 as iox2

    iox2.set_log_level_from_env_or(iox2.LogLevel.Error)  # no "no config file" warning per process
    return iox2


def _service(iox2, node, name: str):
    return (node.service_builder(iox2.ServiceName.new(name))
            .publish_subscribe(iox2.Slice[ctypes.c_uint8]).user_header(FrameHeader)
            .max_publishers(1).max_subscribers(1).history_size(0)
            .subscriber_max_buffer_size(BUFFER).subscriber_max_borrowed_samples(1)
            .enable_safe_overflow(False).open_or_create())


def _events(iox2, node, name: str):
    return node.service_builder(iox2.ServiceName.new(name + "/ev")).event().open_or_create()


def _traced(target, *args) -> None:
    """A spawned peer that dies of a signal (SIGBUS, SIGSEGV) says where."""
    faulthandler.enable()
    target(*args)


def ice_publisher(name: str, shape, n: int, notify: bool, ready, go, dropped) -> None:
    iox2 = _iox2()
    frames, nbytes = _sources(shape), int(np.prod(shape))
    node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
    pub = (_service(iox2, node, name).publisher_builder().initial_max_slice_len(nbytes)
           .backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered)
           .max_loaned_samples(1).create())
    notifier = _events(iox2, node, name).notifier_builder().create() if notify else None
    pub.update_connections()
    ready.set()
    go.wait(60)
    lost, i = 0, 0
    while n < 0 or i < n:  # n < 0: until killed (the crash test)
        t = time.monotonic_ns()
        sample = pub.loan_slice_uninit(nbytes)
        dst = np.frombuffer(sample.payload().as_memory_view(), np.uint8).reshape(shape)
        np.copyto(dst, frames[i % SOURCES])
        h = sample.user_header().contents
        h.t_ns, h.seq, h.ndim, h.dtype = t, i, len(shape), b"uint8"
        h.shape[:len(shape)] = shape
        del dst, h
        lost += sample.assume_init().send() == 0
        if notifier is not None:
            notifier.notify()
        i += 1
    dropped.value = lost


def bench_ice(shape, n: int, mode: str) -> dict:
    iox2 = _iox2()
    name = f"edge-inspect-bench/{os.getpid()}/{shape[0]}/{mode}"
    node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
    sub = _service(iox2, node, name).subscriber_builder().buffer_size(BUFFER).create()
    listener = _events(iox2, node, name).listener_builder().create() if mode == "event" else None
    ctx = mp.get_context("spawn")
    ready, go, dropped = ctx.Event(), ctx.Event(), ctx.Value("q", -1)
    before = set(SHM_DIR.glob("iox2_*.data"))
    proc = ctx.Process(target=_traced,
                       args=(ice_publisher, name, shape, n, mode == "event", ready, go, dropped))
    proc.start()
    # Handshake: the subscriber joins the publisher's connection on its next receive() or
    # has_samples(); before that a publisher facing a full buffer does not block, send()
    # returns 0 and the sample is gone (seen in testing), so wait for that first.
    if not ready.wait(60):
        raise RuntimeError("iceoryx2 publisher did not start")
    sub.has_samples()
    segment = sum(p.stat().st_size for p in set(SHM_DIR.glob("iox2_*.data")) - before)
    go.set()
    lat, nbytes, t0, gaps, expected = [], 0, None, 0, 0
    wait = iox2.Duration.from_millis(100)
    deadline = time.monotonic() + 120
    try:
        while expected < n:
            sample = sub.receive()
            if sample is None:
                if time.monotonic() > deadline or not proc.is_alive() and not sub.has_samples():
                    raise RuntimeError(f"iceoryx2: {expected} of {n} frames arrived")
                if listener is not None:
                    listener.timed_wait(wait)
                continue
            h = sample.user_header().contents
            frame = np.frombuffer(sample.payload().as_memory_view(), np.dtype(h.dtype.decode()))
            frame = frame.reshape(tuple(h.shape[:h.ndim]))
            frame.flags.writeable = False
            _ = int(frame[-1, -1, -1])  # the frame is there, in place
            now = time.monotonic_ns()
            t0 = t0 or time.perf_counter()
            lat.append(now - h.t_ns)
            nbytes += frame.nbytes
            gaps += h.seq != expected
            expected = h.seq + 1
            del frame, h  # a view must not outlive its sample: the memory goes back to the publisher
            sample.delete()
        elapsed = time.perf_counter() - t0
    finally:
        go.set()
        proc.join(30)
        sub.delete()
        if listener is not None:
            listener.delete()
        del sub, listener, node
        gc.collect()
    out = _stats(nbytes, elapsed, lat[1:])
    out.update(dropped=int(dropped.value), sequence_gaps=gaps, data_segment_bytes=segment)
    return out


# -- crash cleanup -------------------------------------------------------------------------------
def _root() -> Path:
    return Path(_iox2().config.global_config().global_cfg.root_path.to_string())


def _state() -> dict:
    root = _root()
    shm = sorted(SHM_DIR.glob("iox2_*"))
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    return {"dev_shm": [p.name for p in shm], "dev_shm_bytes": sum(p.stat().st_size for p in shm),
            "root_files": files}


def _diff(before: dict, now: dict, own_node=None) -> dict:
    """What is new since ``before``; files of ``own_node`` (a live node of ours) are left out."""
    own = str(own_node.id.value) if own_node is not None else None
    shm = [x for x in now["dev_shm"] if x not in before["dev_shm"] and not (own and own in x)]
    root = [x for x in now["root_files"] if x not in before["root_files"] and not (own and own in x)]
    return {"dev_shm_new": len(shm), "dev_shm_new_bytes": now["dev_shm_bytes"] - before["dev_shm_bytes"],
            "root_new": len(root), "kinds": sorted({x.rsplit(".", 1)[-1] for x in shm + root if "." in x}),
            "dev_shm_names": shm, "root_names": root}


def ice_subscriber(name: str, ready) -> None:
    iox2 = _iox2()
    node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
    sub = _service(iox2, node, name).subscriber_builder().buffer_size(BUFFER).create()
    ready.set()
    while True:
        sample = sub.receive()
        if sample is not None:
            sample.delete()


def crash_test(shape) -> dict:
    """SIGKILL the publisher mid-run (subscriber alive), then publisher and subscriber both."""
    iox2 = _iox2()
    ctx = mp.get_context("spawn")
    report, base = {}, _state()
    report["baseline"] = {"dev_shm": len(base["dev_shm"]), "root_files": len(base["root_files"])}

    # 1. the publisher dies, the subscriber (here) lives on
    name = f"edge-inspect-crash/{os.getpid()}/a"
    node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
    sub = _service(iox2, node, name).subscriber_builder().buffer_size(BUFFER).create()
    ready, go, dropped = ctx.Event(), ctx.Event(), ctx.Value("q", -1)
    proc = ctx.Process(target=_traced, args=(ice_publisher, name, shape, -1, False, ready, go, dropped))
    proc.start()
    ready.wait(60)
    sub.has_samples()
    report["while_running"] = _diff(base, _state())
    go.set()
    got = 0
    while got < 20:
        sample = sub.receive()
        if sample is not None:
            got += 1
            sample.delete()
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    report["publisher_killed"] = _diff(base, _state())
    try:
        after = 0
        while sub.receive() is not None:
            after += 1
        report["subscriber_after_kill"] = f"receive() fine, {after} buffered samples still readable"
    except Exception as e:  # noqa: BLE001 - recorded, not handled
        report["subscriber_after_kill"] = f"receive() raised {type(e).__name__}: {e}"
    # a camera process restarted after the crash: may it publish on the same service again?
    ready, go = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_traced, args=(ice_publisher, name, shape, 30, False, ready, go, dropped))
    proc.start()
    got, deadline = 0, time.monotonic() + 30
    if ready.wait(30):
        sub.has_samples()
        go.set()
        while got < 30 and time.monotonic() < deadline:
            sample = sub.receive()
            if sample is not None:
                got += 1
                sample.delete()
    go.set()
    proc.join(30)
    report["restarted_publisher"] = f"exit code {proc.exitcode}, {got} of 30 frames received"
    sub.delete()
    del sub, node
    gc.collect()
    report["subscriber_closed_cleanly"] = _diff(base, _state())
    fresh = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)  # cleans dead nodes on creation
    report["after_new_node"] = _diff(base, _state(), fresh)
    del fresh
    gc.collect()

    # 2. publisher and subscriber both killed (a whole runtime killed outright)
    name = f"edge-inspect-crash/{os.getpid()}/b"
    sready = ctx.Event()
    subp = ctx.Process(target=ice_subscriber, args=(name, sready))
    subp.start()
    sready.wait(60)
    ready, go = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_traced, args=(ice_publisher, name, shape, -1, False, ready, go, dropped))
    proc.start()
    ready.wait(60)
    go.set()
    time.sleep(1.0)
    for p in (proc, subp):
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
    report["both_killed"] = _diff(base, _state())
    fresh = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
    report["both_killed_after_new_node"] = _diff(base, _state(), fresh)
    try:
        fresh.try_cleanup_dead_nodes()
    except Exception as e:  # noqa: BLE001
        report["try_cleanup_dead_nodes_error"] = repr(e)
    report["both_killed_after_try_cleanup_dead_nodes"] = _diff(base, _state(), fresh)
    svc = _service(iox2, fresh, name)  # opening the service again: does it work, does it clean?
    report["reopen_after_both_killed"] = "open_or_create ok"
    del svc, fresh
    gc.collect()
    report["end"] = _diff(base, _state())
    return report


# -- footprint and report ------------------------------------------------------------------------
def _footprint() -> dict:
    out = {}
    for dist in ("iceoryx2", "flatbuffers"):
        d = metadata.distribution(dist)
        files = [Path(d.locate_file(f)) for f in d.files or []]
        out[dist] = {"version": d.version,
                     "installed_bytes": sum(f.stat().st_size for f in files if f.is_file()),
                     "requires": d.requires or [], "requires_python": d.metadata.get("Requires-Python")}
    return out


SETTINGS = {
    "payload": "Slice[ctypes.c_uint8], loan_slice_uninit(frame bytes); "
               "publisher initial_max_slice_len = frame bytes",
    "user_header": "FrameHeader(ctypes.Structure): t_ns, seq, ndim, shape[4], dtype char[8]",
    "service": f"max_publishers 1, max_subscribers 1, history_size 0, subscriber_max_buffer_size {BUFFER}, "
               "subscriber_max_borrowed_samples 1, enable_safe_overflow False",
    "publisher": "backpressure_strategy RetryUntilDelivered, max_loaned_samples 1",
    "subscriber": f"buffer_size {BUFFER}; poll: receive() in a loop; event: Listener.timed_wait(100 ms) "
                  "on an event service the publisher notify()s after each send",
    "receive_view": "np.frombuffer(sample.payload().as_memory_view(), dtype).reshape(shape): no copy",
}

FINDINGS = [
    "**API** (iceoryx2 0.10.0 Python, ctypes-based): `NodeBuilder.new().create(ServiceType.Ipc)` -> "
    "`node.service_builder(ServiceName.new(..)).publish_subscribe(Slice[c_uint8]).user_header(FrameHeader)"
    "...open_or_create()` -> `publisher_builder().initial_max_slice_len(n)` / `subscriber_builder()`; "
    "`loan_slice_uninit(n)`, fill via `payload().as_memory_view()`, `assume_init().send()`; "
    "`receive()` returns a `Sample` or None (no blocking receive: poll, or wait on a separate event "
    "service / WaitSet). No .pyi stubs ship; the API is read from docstrings and the examples.",
    "**Daemon**: none (no RouDi); every process maps the shared memory itself. State: a management "
    "file and one `.data` segment per publisher (sized for buffer + borrowed + loaned samples) plus "
    "connection/dynamic files in /dev/shm, and service/node files under /tmp/iceoryx2; one 16-byte "
    "`iox2_*.global_mgmt` file stays in /dev/shm for good once any node has run. Dead nodes are "
    "cleaned by the next node that starts or opens the service (config defaults "
    "`cleanup_dead_nodes_on_creation` / `_on_open`), the ring's `sweep_stale()` in effect.",
    "**Every_part gotcha**: RetryUntilDelivered only blocks once the subscriber has joined the "
    "connection (on its next receive()/has_samples()); before that a full buffer makes send() "
    "return 0 and the frame is silently dropped (seen in testing), hence the handshake here.",
    "**Metadata**: a fixed-size ctypes user header per sample (shape, dtype, stamp, sequence); "
    "both sides must declare the same header and payload types (the service is typed and refuses "
    "a mismatch). The ring sends shape/dtype in its ZeroMQ reference instead.",
    "**Lifetime**: a numpy view of a sample is a raw pointer: after `sample.delete()` (or GC) the "
    "memory goes back to the publisher with no generation check; the ring's `still_valid()` "
    "catches a rewritten slot.",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=400)
    args = ap.parse_args()
    faulthandler.dump_traceback_later(900, exit=True)  # a stuck peer shows where, instead of hanging
    try:
        iox2_version = metadata.version("iceoryx2")
        _iox2()
    except (ImportError, metadata.PackageNotFoundError):
        print(f"iceoryx2 is not installed for {sys.executable}: pip install iceoryx2 "
              "(in a separate venv, see the docstring)", file=sys.stderr)
        return 1
    report = {"machine": platform.platform(), "python": platform.python_version(),
              "iceoryx2": iox2_version, "frames": args.frames, "settings": SETTINGS, "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape in SIZES.items():
            n = args.frames if name == "1080p" else max(50, args.frames // 4)
            rows = {"numpy copy": bench_copy(shape, n), "shm ring": bench_shm(shape, n, Path(tmp)),
                    "iceoryx2 poll": bench_ice(shape, n, "poll"),
                    "iceoryx2 event": bench_ice(shape, n, "event")}
            rows = {k: v for k, v in rows.items() if v is not None}
            report["sizes"][name] = rows
            print(name, json.dumps(rows), flush=True)
    report["crash"] = crash_test(SIZES["1080p"])
    report["footprint"] = _footprint()
    report["findings"] = FINDINGS
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "iceoryx2_bench.json").write_text(json.dumps(report, indent=2))
    (OUT / "iceoryx2_bench.md").write_text(render(report, args.frames))
    print(render(report, args.frames))
    return 0


def render(report: dict, frames: int) -> str:
    n4k = max(50, frames // 4)
    lines = ["# iceoryx2 vs the shared-memory ring (`benchmarks/iceoryx2_bench.py`)\n",
             f"Machine: {report['machine']}, Python {report['python']}, iceoryx2 {report['iceoryx2']}; "
             f"one run, {frames} 1080p / {n4k} 4K frames from 8 rotating sources.\n",
             f"    {COMMAND.format(frames=frames)}\n",
             "| frame | path | GB/s | p50 ms | p99 ms | vs numpy copy | vs shm ring | dropped |",
             "|---|---|---|---|---|---|---|---|"]
    for name, rows in report["sizes"].items():
        base, ring = rows["numpy copy"]["gb_per_s"], rows["shm ring"]["gb_per_s"]
        for path, r in rows.items():
            lost = r.get("dropped", r.get("overwritten", ""))
            lines.append(f"| {name} | {path} | {r['gb_per_s']:.2f} | {r['latency_ms_p50']:.2f} | "
                         f"{r['latency_ms_p99']:.2f} | {r['gb_per_s'] / base:.2f}x | "
                         f"{r['gb_per_s'] / ring:.2f}x | {lost} |")
    lines += ["", "Paths: `shm ring` = `transport_bench.bench_shm`, the runtime's `transport: shm` code in "
              "every_part (RingFrames waits for a free slot and writes, the reference message goes over "
              "ZeroMQ, RingSet reads in place and hands the slot back); "
              "`iceoryx2 poll` = subscriber spins on `receive()`; `iceoryx2 event` = subscriber sleeps on "
              "an iceoryx2 event the publisher notifies. `dropped` = overwritten (ring) or send() "
              "reaching no subscriber (iceoryx2); every path must show 0."]
    seg = {k: v["iceoryx2 poll"]["data_segment_bytes"] for k, v in report["sizes"].items()}
    fp, crash = report["footprint"], report["crash"]
    lines += ["", "Settings: " + "; ".join(f"{k}: {v}" for k, v in report["settings"].items()) + ".", "",
              "## Findings", ""]
    lines += [f"- {f}" for f in report["findings"]]
    lines.append(
        f"- **Footprint**: iceoryx2 {fp['iceoryx2']['version']} installs "
        f"{fp['iceoryx2']['installed_bytes'] / 1e6:.1f} MB (one Rust extension, abi3: "
        f"Python {fp['iceoryx2']['requires_python']}) and pins flatbuffers=={fp['flatbuffers']['version']} "
        f"({fp['flatbuffers']['installed_bytes'] / 1e6:.2f} MB). The wheel is 1.6 MB "
        "(cp38-abi3-manylinux_2_34_x86_64); PyPI has macOS arm64 and Windows wheels too, but no "
        "Linux aarch64 wheel (a Jetson builds the 1 MB sdist with Rust + maturin). Shared memory "
        f"per publisher: {', '.join(f'{k} {v / 1e6:.0f} MB' for k, v in seg.items())} "
        f"({BUFFER + 2} samples) vs the ring's 8 slots.")
    lines.append(
        "- **Crash cleanup** (files new since the start, /dev/shm + /tmp/iceoryx2): "
        f"while running {_fmt(crash['while_running'])}; publisher SIGKILLed "
        f"{_fmt(crash['publisher_killed'])}, subscriber: {crash['subscriber_after_kill']}; "
        f"a restarted publisher on the same service: {crash['restarted_publisher']}; "
        f"subscriber closed {_fmt(crash['subscriber_closed_cleanly'])}; a new node (its own files "
        f"left out) {_fmt(crash['after_new_node'])}. Publisher and subscriber both SIGKILLed "
        f"{_fmt(crash['both_killed'])}; a new node started {_fmt(crash['both_killed_after_new_node'])}; "
        f"try_cleanup_dead_nodes {_fmt(crash['both_killed_after_try_cleanup_dead_nodes'])}; "
        f"end {_fmt(crash['end'])}.")
    return "\n".join(lines) + "\n"


def _fmt(d: dict) -> str:
    kinds = "/".join(d["kinds"])
    return (f"{d['dev_shm_new']} in /dev/shm ({d['dev_shm_new_bytes'] / 1e6:.1f} MB), "
            f"{d['root_new']} under the root" + (f" [{kinds}]" if kinds else ""))


if __name__ == "__main__":
    raise SystemExit(main())
