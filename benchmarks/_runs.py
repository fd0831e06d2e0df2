"""What the benchmark experiments share: one JSON per finished run, written at once, skipped on rerun.

A long experiment is a list of runs; each run's record is written atomically as soon as it
finishes, so an interrupted experiment resumes where it stopped and results can be committed as
they arrive.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

__all__ = ['environment', 'load_note', 'recorded_command', 'run_pending', 'source_commit', 't_975', 'write_json']


def source_commit() -> Optional[str]:
    """The checkout's commit (with '+changes' when the tree differs), for the record."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ('+changes' if dirty else '')


def environment(device: str, threads: int, jobs: int) -> Dict[str, Any]:
    import timm
    return dict(device=device, threads=threads, jobs=jobs, torch=torch.__version__, timm=timm.__version__,
                python=platform.python_version(), host_cpus=os.cpu_count(), commit=source_commit(),
                load_average=list(os.getloadavg()))  # 1, 5, 15 min when the record is written


def load_note(envs: Sequence[Dict[str, Any]]) -> str:
    """How busy the machine was, as far as the records say (the load average came into them on 2026-12-03)."""
    loads = [e['load_average'][1] for e in envs if e.get('load_average')]
    if not loads:
        return 'machine load not recorded'
    return (f'5-min load average {min(loads):.1f}-{max(loads):.1f} when the runs ended '
            f'({len(loads)} of {len(envs)} runs)')


def t_975(dof: int) -> float:
    """Two-sided 5% critical value of Student's t: tabled to 9 degrees of freedom, beyond that the
    Cornish-Fisher expansion (within 0.001 of the table: 2.228 at 10, 2.093 at 19, 1.960 in the limit)."""
    table = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}
    if dof in table:
        return table[dof]
    z, v = 1.959964, float(dof)
    return z + (z ** 3 + z) / (4 * v) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * v ** 2) \
        + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * v ** 3)


def write_json(path: Path, record: Dict[str, Any]) -> Path:
    """Write ``record`` so that a reader never sees half a file."""
    tmp = path.with_suffix('.tmp')
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
    return path


def recorded_command(md_path: Path, script: str, argv: Optional[Sequence[str]], report_only: bool) -> str:
    """The command lines a report prints: every one that made its runs so far, this one added unless it
    only rewrites the report (a protocol may be spread over several commands and sittings)."""
    command = ' '.join([f'python benchmarks/{script}'] + list(sys.argv[1:] if argv is None else argv))
    previous = md_path.read_text().split('```')[1].strip() if md_path.exists() and '```' in md_path.read_text() else ''
    if report_only or command in previous.splitlines():
        return previous or command
    return '\n'.join([c for c in previous.splitlines() if c] + [command])


def run_pending(
        runs: Sequence[Tuple[Any, ...]],
        done: Callable[[Tuple[Any, ...]], bool],
        worker: Callable[..., str],
        args: Any,
        jobs: int,
        after_each: Callable[[], Any],
) -> None:
    """Run ``worker(args, *run)`` for every run not ``done`` yet, ``jobs`` at a time (spawned
    processes), calling ``after_each`` when one finishes (e.g. to rewrite the report)."""
    todo = [r for r in runs if not done(r)]
    print(f'{len(todo)} runs to do ({len(runs) - len(todo)} already done)', flush=True)
    if jobs == 1:
        for run in todo:
            print('wrote', worker(args, *run), flush=True)
            after_each()
        return
    import multiprocessing as mp
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context('spawn')) as ex:
        futures = [ex.submit(worker, args, *run) for run in todo]
        for f in as_completed(futures):
            print('wrote', f.result(), flush=True)
            after_each()
    sys.stdout.flush()
