"""One import name: a wheel built from the checkout installs ``net2grow`` with its three
subpackages, its API at the top, ``py.typed`` and the ``net2grow`` command, and works from
outside the repository (the editable install is what the other tests use)."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
_NOT_SOURCE = (".venv", ".git", "build", "dist", "runs", "results", "*.egg-info", "__pycache__")
_NOT_SOURCE += (".hypothesis", ".ruff_cache", ".pytest_cache", "*.n2g")


def _run(args: list[str], cwd: pathlib.Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, env=env, timeout=600, check=False
    )
    assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-3000:])
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The wheel, installed into a folder of its own (no dependencies: those are the venv's)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # a clean copy: no build/ left over from an earlier build
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*_NOT_SOURCE))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp), str(source)], tmp)
    (wheel,) = tmp.glob("net2grow-*.whl")
    _run([*pip, "install", "--no-deps", "--target", str(tmp / "site"), str(wheel)], tmp)
    return tmp / "site"


def test_wheel_installs_one_package_with_its_subpackages(installed: pathlib.Path) -> None:
    top = sorted(p.name for p in installed.iterdir() if not p.name.endswith(".dist-info"))
    assert [n for n in top if n != "bin"] == ["net2grow"]
    in_repo = {
        init.parent.relative_to(REPO).as_posix()
        for top in ("growth", "strategies", "benchmarks")
        for init in (REPO / top).rglob("__init__.py")
    }
    assert {"growth/rules", "growth/checkpoint", "strategies/resume"} <= in_repo
    for sub in sorted(in_repo):  # every package of the checkout is in the wheel
        assert (installed / "net2grow" / sub / "__init__.py").is_file(), sub
    assert (installed / "net2grow" / "py.typed").is_file()
    assert (installed / "bin" / "net2grow").is_file()


def test_installed_package_works_outside_the_repository(
    installed: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    code = """
import pathlib, torch
import net2grow
from net2grow import EveryExperience, GrowableNetwork, GrowthPlugin, load, save
from net2grow.growth import GrowableNetwork as Same
assert GrowableNetwork is Same
site = pathlib.Path(SITE)
for mod in (net2grow, net2grow.growth, net2grow.strategies, net2grow.benchmarks):
    assert site in pathlib.Path(mod.__file__).parents, mod.__file__
net = GrowableNetwork(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(),
                                          torch.nn.Linear(4, 2)), torch.randn(5, 3))
net.widen("0", 6)
save(net, "n.n2g")
assert load("n.n2g").width("0") == 6
assert GrowthPlugin(EveryExperience(factor=1.5)) is not None
print(net2grow.__version__)
""".replace("SITE", repr(str(installed)))
    env = {**os.environ, "PYTHONPATH": str(installed)}
    out = _run([sys.executable, "-c", code], tmp_path, env)
    assert out.strip() == "0.1.0"
    help_text = _run([sys.executable, "-m", "net2grow.benchmarks", "--help"], tmp_path, env)
    assert "continual" in help_text and "net2net" in help_text
