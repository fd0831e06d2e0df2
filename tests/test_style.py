import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_clean():
    ruff = shutil.which('ruff', path=str(Path(sys.executable).parent)) or shutil.which('ruff')
    assert ruff is not None, 'ruff is part of the test extras: pip install -e .[test]'
    proc = subprocess.run([ruff, 'check', 'timm_ddw', 'tests', 'benchmarks'], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
