"""Run any script (e.g. timm's train.py) with the ddw models registered.

For environments where the post-import hook's .pth file is not processed (``python -S``,
embedded interpreters, some launchers)::

    python -m timm_ddw.run train.py /data/imagenet --model ddw_resnet50 ...
    torchrun --nproc_per_node=8 -m timm_ddw.run train.py /data/imagenet --model ddw_resnet50 ...
    python -m timm_ddw.run -m some.module ARGS...

The script runs as ``__main__`` with ``sys.argv`` and ``sys.path[0]`` set as ``python SCRIPT`` would.
"""
from __future__ import annotations

import os
import runpy
import sys
from typing import List, Optional

import timm_ddw  # noqa: F401  (registers the ddw_* models)

USAGE = 'usage: python -m timm_ddw.run SCRIPT.py [ARGS...]  |  python -m timm_ddw.run -m MODULE [ARGS...]'


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ('-h', '--help'):
        print(USAGE, file=sys.stderr if not argv else sys.stdout)
        return 2 if not argv else 0
    if argv[0] == '-m':
        if len(argv) < 2:
            print(USAGE, file=sys.stderr)
            return 2
        sys.argv = argv[1:]
        sys.path.insert(0, os.getcwd())
        runpy.run_module(argv[1], run_name='__main__', alter_sys=True)
        return 0
    script = argv[0]
    if not os.path.isfile(script):
        print(f'timm_ddw.run: SCRIPT {script!r} is not a file\n{USAGE}', file=sys.stderr)
        return 2
    sys.argv = argv
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name='__main__')
    return 0


if __name__ == '__main__':
    sys.exit(main())
