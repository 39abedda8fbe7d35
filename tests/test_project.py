"""Project wiring: README's fresh-machine commands, .ci/run, the console command."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def fresh_machine_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = re.search(r"## Fresh machine\n(.*?)\n## ", text, re.S)
    assert section, "README.md needs a '## Fresh machine' section"
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", section.group(1), re.S)
    return [line.strip() for b in blocks for line in b.strip().splitlines() if line.strip()]


def test_readme_has_exactly_two_fresh_machine_commands():
    cmds = fresh_machine_commands()
    assert len(cmds) == 2, cmds
    assert "demo" in cmds[0] and "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci/run").read_text()
    assert fresh_machine_commands()[1] in ci


def test_console_command_help():
    proc = subprocess.run([sys.executable, "-m", "edge_inspect.runtime.cli", "--help"], capture_output=True,
                          text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0
    for name in ("demo", "info", "inspect-weights"):
        assert name in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "edge_inspect.runtime.cli", "nope"], capture_output=True,
                         text=True, cwd=REPO, timeout=60)
    assert bad.returncode == 2 and "unknown command 'nope'" in bad.stderr


def test_layout():
    for folder in ("runtime", "export", "trainer", "configs", "tests", "benchmarks"):
        assert (REPO / folder).is_dir(), folder


def test_ruff_is_clean():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "."], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
