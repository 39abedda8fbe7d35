"""One namespace: the layers install as edge_inspect.runtime / .trainer / .export.

The folders stay at the top of the checkout, but nothing called ``runtime``, ``trainer`` or
``export`` may land in site-packages (PyPI has distributions with those names). Checked for
the editable install the tests run in and for a wheel built from the same files.
"""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("runtime", "trainer", "export")
PROBE = """
import importlib, sys
for bare in ("runtime", "trainer", "export"):
    try:
        importlib.import_module(bare)
    except ModuleNotFoundError:
        pass
    else:
        sys.exit(f"bare {bare} is importable")
import edge_inspect.runtime.bundle, edge_inspect.runtime.cli
print(edge_inspect.runtime.bundle.__file__)
"""


def probe(cwd: Path, pythonpath: str | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin"} | ({"PYTHONPATH": pythonpath} if pythonpath else {})
    return subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_editable_install_is_only_the_namespace(tmp_path):
    proc = probe(tmp_path)  # outside the checkout: only what is installed counts
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert proc.stdout.strip() == str(REPO / "runtime" / "bundle.py")


def test_wheel_holds_only_the_namespace(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for layer in LAYERS:
        shutil.copytree(REPO / layer, src / layer, ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(tmp_path / "dist"), str(src)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("edge_inspect-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"edge_inspect"}, tops
    for layer in LAYERS:  # every subpackage of every layer made it in
        for init in (REPO / layer).rglob("__init__.py"):
            rel = init.relative_to(REPO).as_posix()
            assert f"edge_inspect/{rel}" in names, rel
    assert "edge_inspect/runtime/monitor.html" in names  # the page `edge-inspect monitor` serves
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt")))
    assert b"edge-inspect = edge_inspect.runtime.cli:main" in entry

    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                              str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    # the wheel's copy, not the checkout's, is what imports (numpy etc. from the venv)
    where_numpy = "import numpy, os; print(os.path.dirname(os.path.dirname(numpy.__file__)))"
    site = subprocess.run([sys.executable, "-c", where_numpy], capture_output=True, text=True).stdout.strip()
    proc = probe(tmp_path, f"{target}:{site}")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert proc.stdout.strip() == str(target / "edge_inspect" / "runtime" / "bundle.py")
