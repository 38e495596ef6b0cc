"""The wheel users install holds every module of the source tree and works without the checkout.

An editable install (``pip install -e``) reads the source tree and hides files missing from the
wheel: ``fa_dynamo/passes/`` once had no ``__init__.py``, so ``packages = find:`` left every pass
out and ``import fa_dynamo`` failed after ``pip install .``. These tests build the wheel from a
clean copy of the source, compare its modules with the tree, install it into an empty folder and
use it from a process that cannot see the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

# CI runs the suite from a copy of tests/ next to the installed wheel; it names the checkout here.
SOURCE = Path(os.environ.get("FASTATTENTION_SOURCE_TREE", Path(__file__).resolve().parents[1]))
PACKAGE_FILES = ("setup.cfg", "pyproject.toml", "README.md")
SOURCE_PATTERNS = ("*.py", "*.cpp")  # modules, and the C++ kernels built on first use

USE_INSTALLED = r"""
import importlib, pkgutil, sys
from pathlib import Path
import torch

def attention(q, k, v):
    s = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    s = s + torch.triu(torch.full((q.shape[-2],) * 2, float("-inf")), diagonal=1)
    return torch.softmax(s, dim=-1) @ v

torch.manual_seed(0)
q, k, v = (torch.randn(2, 3, 37, 16) for _ in range(3))
out = torch.compile(attention, backend="fastattention", options={"inner": "eager"})(q, k, v)  # by entry point
torch.testing.assert_close(out, attention(q, k, v), atol=2e-5, rtol=1e-4)
fa_dynamo = sys.modules["fa_dynamo"]
for info in pkgutil.walk_packages(fa_dynamo.__path__, "fa_dynamo."):
    importlib.import_module(info.name)
for name, module in list(sys.modules.items()):  # all from the wheel, none rescued by an editable install's finder
    if name.split(".")[0] == "fa_dynamo":
        where = module.__file__  # None: a folder without __init__.py, left out of the wheel
        assert where and Path(where).resolve().is_relative_to(Path(sys.argv[1]).resolve()), (name, where)
from fa_dynamo.kernels import decode_kernel  # its C++ source ships in the wheel and builds from there
assert decode_kernel.SOURCE.resolve().is_relative_to(Path(sys.argv[1]).resolve()) and decode_kernel.decode_kernel_available()
print("fused", fa_dynamo.explain(attention, q, k, v).fused)
"""


def _source_modules() -> set[str]:
    root = SOURCE / "fa_dynamo"
    if not root.is_dir():
        raise FileNotFoundError(f"no source tree at {SOURCE}: set FASTATTENTION_SOURCE_TREE to the checkout")
    return {p.relative_to(SOURCE).as_posix() for pattern in SOURCE_PATTERNS for p in root.rglob(pattern)
            if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the package's files (no stale ``build/`` can leak into it)."""
    src = tmp_path_factory.mktemp("src")
    shutil.copytree(SOURCE / "fa_dynamo", src / "fa_dynamo", ignore=shutil.ignore_patterns("__pycache__"))
    for name in PACKAGE_FILES:
        shutil.copy(SOURCE / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    (built,) = out.glob("fa_dynamo-*.whl")
    return built


def test_wheel_holds_every_source_module(wheel):
    with zipfile.ZipFile(wheel) as zf:
        packaged = {n for n in zf.namelist() if n.startswith("fa_dynamo/") and n.endswith((".py", ".cpp"))}
        entry_points = next(zf.read(n).decode() for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt"))
    assert packaged == _source_modules(), (
        f"missing from the wheel: {sorted(_source_modules() - packaged)}; "
        f"not in the source tree: {sorted(packaged - _source_modules())}"
    )
    assert "fastattention = fa_dynamo.backend:fastattention" in entry_points


def test_installed_wheel_imports_and_fuses_without_the_checkout(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(wheel)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FA_DYNAMO_")}
    env["PYTHONPATH"] = str(target)  # ahead of site-packages, where an editable install may point at the checkout
    run = subprocess.run(
        [sys.executable, "-c", USE_INSTALLED, str(target)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.split()[-1] == "1", run.stdout
