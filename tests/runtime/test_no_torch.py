"""The runtime layer imports and runs where torch cannot be imported (a Jetson)."""

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

BLOCK_TORCH = textwrap.dedent("""
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "trainer", "export"):
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Block())
""")


def run_blocked(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(code)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_blocker_really_blocks():
    proc = run_blocked("import torch")
    assert proc.returncode != 0 and "blocked in this test" in proc.stderr


def test_every_runtime_module_imports_without_torch():
    proc = run_blocked("""
        import importlib, pkgutil, sys
        import runtime
        names = [m.name for m in pkgutil.walk_packages(runtime.__path__, "runtime.")]
        for name in names:
            importlib.import_module(name)
        assert "torch" not in sys.modules
        print(len(names), "modules")
    """)
    assert proc.returncode == 0, proc.stderr
    assert "modules" in proc.stdout


def test_cli_runs_runtime_commands_without_torch():
    proc = run_blocked("""
        from runtime.cli import main
        raise SystemExit(main(["info"]))
    """)
    assert proc.returncode == 0, proc.stderr
    assert "onnxruntime providers" in proc.stdout


def test_cli_names_the_missing_layer():
    proc = run_blocked("""
        from runtime.cli import main
        raise SystemExit(main(["demo"]))
    """)
    assert proc.returncode != 0
    assert "needs the trainer extra" in proc.stderr
