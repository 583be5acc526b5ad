"""Installing from a clone: the build writes nothing into the source tree (no ``build/``,
no ``*.egg-info``), and the wheel holds the package with its templates, migrations and
``py.typed``, nothing else of the repository."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from project.demo.localcluster import ROOT


def _tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def test_building_a_wheel_from_a_checkout_leaves_the_checkout_as_it_was(tmp_path: Path) -> None:
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    checkout = tmp_path / "checkout"
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, checkout / name)
    before = _tree(checkout)
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(checkout),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    assert _tree(checkout) - before == set(), "the build wrote into the source tree"
    (wheel,) = (tmp_path / "dist").glob("cluster_singletons-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "cluster_singletons/py.typed",
        "cluster_singletons/templates/admin/cluster_singletons/dashboard.html",
        "cluster_singletons/migrations/0001_initial.py",
        "cluster_singletons/management/commands/cluster_probe.py",
    ):
        assert needed in names
    assert {n.split("/")[0] for n in names} <= {
        "cluster_singletons",
        wheel.name.split("-py3")[0] + ".dist-info",
    }, "only the package and its metadata"
