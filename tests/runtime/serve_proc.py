"""`edge-inspect serve` as a real process (torch blocked), and what tests read from outside it:
its /metrics, its process tree and its memory (Linux /proc)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from tests.runtime.test_no_torch import BLOCK_TORCH, REPO


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(body: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    m = re.search(rf"^{name}\{{{re.escape(want)}\}} (\S+)$", body, re.M)
    return float(m.group(1)) if m else 0.0


def series_count(body: str) -> int:
    return sum(1 for line in body.splitlines() if line and not line.startswith("#"))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(stat.rpartition(")")[2].split()[1])


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, their children, ...)."""
    parents = {int(p): _ppid(int(p)) for p in os.listdir("/proc") if p.isdigit()}
    found, frontier = [], [pid]
    while frontier:
        kids = [c for c, pp in parents.items() if pp in frontier and alive(c)]
        found += kids
        frontier = kids
    return found


RUNNING: list[Serve] = []  # killed after each test by tests/runtime/conftest.py, pass or fail


class Serve:
    """One ``serve`` process for a profile mapping; ``port`` and ``base`` once it printed its line."""

    def __init__(self, profile: dict, tmp_path: Path, name: str = "serve") -> None:
        self.path = tmp_path / f"{name}.yaml"
        self.path.write_text(yaml.safe_dump(profile))
        code = BLOCK_TORCH + ("from edge_inspect.runtime.cli import main\n"
                              f"raise SystemExit(main(['serve', '--config', r'{self.path}']))")
        self.stderr_path = tmp_path / f"{name}.stderr"  # a file: a full pipe would block serve
        with open(self.stderr_path, "w") as stderr:
            self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                                         stderr=stderr, text=True)
        self.pid = self.proc.pid
        self.port = self.base = None
        RUNNING.append(self)

    def started(self, timeout: float = 60) -> Serve:
        """Wait for the serving line (raises with stderr when serve exits first)."""
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout)
            raise AssertionError(f"serve exited {self.proc.returncode}: {self.errors()}")
        m = re.search(r"127\.0\.0\.1:(\d+)/metrics", line)
        if m:
            self.port = int(m.group(1))
            self.base = f"http://127.0.0.1:{self.port}"
        return self

    def ready(self, timeout: float = 60) -> Serve:
        deadline = time.monotonic() + timeout
        while http_get(self.base + "/readyz")[0] != 200:
            assert self.proc.poll() is None, self.errors()
            assert time.monotonic() < deadline, http_get(self.base + "/readyz")
            time.sleep(0.2)
        return self

    def errors(self) -> str:
        """What serve wrote to stderr so far (its log)."""
        return self.stderr_path.read_text()

    def metrics(self) -> str:
        return http_get(self.base + "/metrics")[1]

    def value(self, name: str, **labels) -> float:
        return metric(self.metrics(), name, **labels)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        for pid in [self.pid, *descendants(self.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)
