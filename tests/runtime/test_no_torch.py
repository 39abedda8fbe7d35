"""The runtime layer imports and runs where torch cannot be imported (a Jetson)."""

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# A machine without torch: importing it fails as an absent package does.
BLOCK_TORCH = textwrap.dedent("""
    import importlib.abc, sys

    BLOCKED = ("torch",) + tuple(sys.argv[1:])

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked in this test)",
                                          name=name)
            return None

    sys.meta_path.insert(0, Block())
""")
LAYERS = ["edge_inspect.trainer", "edge_inspect.export"]


def run_blocked(code: str, also: list[str] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(code), *also],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_blocker_really_blocks():
    proc = run_blocked("import torch")
    assert proc.returncode != 0 and "blocked in this test" in proc.stderr
    proc = run_blocked("import edge_inspect.trainer", LAYERS)
    assert proc.returncode != 0 and "blocked in this test" in proc.stderr


def test_every_runtime_module_imports_without_torch_trainer_or_export():
    proc = run_blocked("""
        import importlib, pkgutil, sys
        import edge_inspect.runtime as runtime
        names = [m.name for m in pkgutil.walk_packages(runtime.__path__, "edge_inspect.runtime.")]
        for name in names:
            importlib.import_module(name)
        assert "torch" not in sys.modules
        assert not [m for m in sys.modules if m.startswith(("edge_inspect.trainer", "edge_inspect.export"))]
        print(len(names), "modules")
    """, LAYERS)
    assert proc.returncode == 0, proc.stderr
    assert "modules" in proc.stdout and int(proc.stdout.split()[0]) > 20


def test_cli_runs_runtime_commands_without_torch():
    proc = run_blocked("""
        from edge_inspect.runtime.cli import main
        raise SystemExit(main(["info"]))
    """, LAYERS)
    assert proc.returncode == 0, proc.stderr
    assert "onnxruntime providers" in proc.stdout


def test_cli_names_the_missing_extra(tmp_path):
    """Missing torch is named as such, whether the subcommand imports it at once (train) or
    only inside its run (demo)."""
    for argv in (["train", "--help"], ["demo", "--bundle", str(tmp_path / "b"), "--out", str(tmp_path)]):
        proc = run_blocked(f"""
            from edge_inspect.runtime.cli import main
            raise SystemExit(main({argv!r}))
        """)
        assert proc.returncode != 0
        assert "the module 'torch' is not installed" in proc.stderr, proc.stderr
        assert "needs the trainer extra" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_cli_reraises_a_genuine_import_error_inside_the_project():
    """A broken import inside edge_inspect (here: the run config module raising as a renamed
    name would) is a bug to show with its traceback, not a missing extra."""
    proc = run_blocked("""
        import importlib.abc, sys

        class Broken(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "edge_inspect.trainer.config":
                    raise ImportError("cannot import name 'RunConfig' (simulated bug)", name=name)
                return None

        sys.meta_path.insert(0, Broken())
        from edge_inspect.runtime.cli import main
        main(["train", "--help"])
    """)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "simulated bug" in proc.stderr
    assert "needs the" not in proc.stderr
    # a module of the project that does not exist is also a bug, not a missing extra
    proc = run_blocked("""
        from edge_inspect.runtime import cli
        cli._load(cli.Subcommand("x", "x", "trainer.no_such_module"))
    """)
    assert proc.returncode == 1 and "ModuleNotFoundError" in proc.stderr
    assert "needs the" not in proc.stderr
