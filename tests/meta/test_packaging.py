"""What `pip install` puts in site-packages: one top-level name, `vpr`."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_wheel_installs_one_top_level_name(tmp_path: Path) -> None:
    # a copy of the tracked tree, links kept, so that the build leaves nothing in the checkout
    src = tmp_path / "src"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for rel in filter(None, tracked.decode().split("\0")):
        if (REPO / rel).is_symlink() or (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel, follow_symlinks=False)
    out = tmp_path / "wheel"
    # --no-build-isolation: build with the setuptools the dev extras installed, offline
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = out.glob("vpr_distill-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        assert z.read(top_level).decode().split() == ["vpr"]
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    roots = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert roots == {"vpr"}
    # the packages' files are in the wheel (followed through the vpr/ links), the web page too
    for must in ("vpr/settings.py", "vpr/model/network.py", "vpr/server/static/index.html", "vpr/cli/main.py"):
        assert must in names, f"{must} missing from the wheel"
    assert "vpr = vpr.cli.main:main" in entry_points
