"""Shared fixtures: the reference QEMU tools and blockengine's CLI as the same programs.

``be_img`` runs blockengine through a launcher named ``qemu-img`` (made by
``blockengine install-links``), so its messages carry the same program name as the
real tool's and outputs compare byte for byte.  ``run_both`` runs one command line
through both, each in its own directory prepared identically.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.tooling import require_tool  # noqa: E402


@pytest.fixture(scope="session")
def qemu_img() -> str:
    return require_tool("qemu-img")


@pytest.fixture(scope="session")
def qemu_io() -> str:
    return require_tool("qemu-io")


@pytest.fixture(scope="session")
def be_bindir(tmp_path_factory) -> Path:
    """A directory with qemu-img/qemu-io/... launchers running this source tree."""
    bindir = tmp_path_factory.mktemp("be-bin")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-m", "blockengine.cli", "install-links", str(bindir)],
                   check=True, env=env, cwd=ROOT)
    return bindir


def _run(argv, cwd=None, input=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], cwd=cwd, input=input,
                          capture_output=True, timeout=300)


@pytest.fixture
def be_img(be_bindir):
    """Run blockengine as qemu-img: be_img(*args, cwd=None) -> CompletedProcess."""
    def run(*args, cwd=None, input=None):
        return _run([be_bindir / "qemu-img", *args], cwd, input)
    return run


@dataclass
class Both:
    ref: subprocess.CompletedProcess
    ours: subprocess.CompletedProcess
    ref_dir: Path
    our_dir: Path

    def assert_same(self) -> None:
        """stdout, stderr and exit status are byte-identical."""
        assert self.ours.stderr.decode() == self.ref.stderr.decode()
        assert self.ours.stdout.decode() == self.ref.stdout.decode()
        assert self.ours.returncode == self.ref.returncode


@pytest.fixture
def run_both(qemu_img, be_img, tmp_path):
    """run_both(args, prepare=None) -> Both; ``prepare(dir)`` fills each work dir."""
    counter = [0]

    def run(args, prepare=None) -> Both:
        counter[0] += 1
        dirs = []
        for side in ("ref", "ours"):
            d = tmp_path / ("%s%d" % (side, counter[0]))
            d.mkdir()
            if prepare is not None:
                prepare(d)
            dirs.append(d)
        for _ in range(20):
            ref = _run([qemu_img, *args], dirs[0])
            if PBKDF_FLAKE not in ref.stderr:
                break
            # qemu-img's PBKDF2 calibration fails now and then on a busy machine: the
            # reference runs again, in a freshly prepared directory
            shutil.rmtree(dirs[0])
            dirs[0].mkdir()
            if prepare is not None:
                prepare(dirs[0])
        ours = be_img(*args, cwd=dirs[1])
        return Both(ref, ours, dirs[0], dirs[1])
    return run


PBKDF_FLAKE = b"Unable to get accurate CPU usage"
