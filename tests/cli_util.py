"""Helpers of the command-line tests: tiny image folders and ``timm-ddw`` in a child process."""
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / 'timm-ddw'  # the installed console script
TIMM_DDW = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, '-m', 'timm_ddw']

# runs many command lines through timm_ddw.cli.main in one child process (one torch import, not
# one per case); anything main lets escape is printed as the console script would print it
BATCH = textwrap.dedent('''
    import contextlib, io, json, sys, traceback
    from timm_ddw.cli import main
    results = []
    for argv in json.load(open(sys.argv[1])):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as e:
                rc = e.code
            except BaseException:
                traceback.print_exc(file=err)
                rc = 'traceback'
        results.append(dict(argv=argv, rc=rc, out=out.getvalue(), err=err.getvalue()))
    json.dump(results, open(sys.argv[2], 'w'))
''')


def cli_env(tmp: Path, **extra: str) -> Dict[str, str]:
    """A child environment without the user's Hugging Face token or cache, offline, one thread."""
    env = dict(os.environ, HF_HOME=str(tmp / 'hf_home'), HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
    env.pop('HF_TOKEN', None)
    env.update(extra)
    return env


def run_cli_batch(cases: Sequence[List[str]], tmp: Path, env: Optional[Dict[str, str]] = None,
                  timeout: int = 600) -> List[dict]:
    """``timm-ddw ARGV`` for every case in one child process: [{argv, rc, out, err}, ...]."""
    cases_file, results_file = tmp / 'cli_cases.json', tmp / 'cli_results.json'
    cases_file.write_text(json.dumps([[str(a) for a in argv] for argv in cases]))
    proc = subprocess.run([sys.executable, '-c', BATCH, str(cases_file), str(results_file)], cwd=tmp,
                          env=env or cli_env(tmp), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(results_file.read_text())


def run_cli(argv: Sequence, tmp: Path, env: Optional[Dict[str, str]] = None,
            timeout: int = 600) -> subprocess.CompletedProcess:
    """The installed ``timm-ddw`` console script, as a user runs it."""
    return subprocess.run(TIMM_DDW + [str(a) for a in argv], cwd=tmp, env=env or cli_env(tmp),
                          capture_output=True, text=True, timeout=timeout)


def one_error_line(stderr: str, command: str) -> str:
    """The single line a user error prints; fails on tracebacks and extra lines."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert 'Traceback' not in stderr, stderr
    assert lines and lines[0].startswith(f'timm-ddw {command}: error: '), stderr
    return lines[0]


def make_image_folder(root: Path, splits: Dict[str, int], classes: Sequence[str] = ('cat', 'dog'),
                      size: int = 16, loose: int = 0, seed: int = 0) -> Path:
    """``root/<split>/<class>/<i>.png`` random images; ``loose`` more directly in each split folder."""
    rng = np.random.default_rng(seed)
    for split, n in splits.items():
        folder = root / split if split else root
        for c in classes:
            (folder / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / c / f'{i}.png')
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(loose):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f'loose{i}.png')
    return root


def md5s(folder: Path) -> Dict[str, str]:
    """Checksum of every file under ``folder``: to show that a command left it as it was."""
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob('*')) if p.is_file()}
