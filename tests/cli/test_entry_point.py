"""run.py and the console script end through console_main: main's status, output flushed."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bids_dmri_ldm import __version__

REPO = Path(__file__).resolve().parents[2]


def test_run_py_exits_with_mains_status_and_its_output_flushed(tmp_path):
    shown = subprocess.run([sys.executable, str(REPO / "run.py"), "--version"], capture_output=True, text=True,
                           cwd=tmp_path, check=False)
    assert shown.returncode == 0 and __version__ in shown.stdout
    bare = subprocess.run([sys.executable, str(REPO / "run.py")], capture_output=True, text=True, cwd=tmp_path,
                          check=False)
    assert bare.returncode == 64
    assert "usage:" in bare.stderr and "required" in bare.stderr.splitlines()[-1]
    missing = subprocess.run([sys.executable, str(REPO / "run.py"), str(tmp_path / "nowhere"), str(tmp_path / "out"),
                              "participant"], capture_output=True, text=True, cwd=tmp_path, check=False)
    assert missing.returncode != 0 and missing.stderr.strip().splitlines()[-1].startswith("bids-dmri-ldm: error:")
