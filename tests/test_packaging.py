"""A plain (non-editable) install carries everything the commands need."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_ships_the_configs_and_every_subpackage(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("orchestrator-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"orchestrator/configs/{p.name}" for p in (ROOT / "orchestrator" / "configs").glob("*.yaml")}
    assert shipped and shipped <= names
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "orchestrator").rglob("*.py")}
    assert modules <= names  # common/, soup/ (recipes/, tasks/), proxy/, the entry points
