"""How many torch threads and loader workers the main job (``timm-ddw train``) should use by default.

Times the main job's own training loop (``timm_ddw.train.train``: ddw_resnet18, 32 px, batch 128)
on a slice of Fashion-MNIST with every (threads, workers) setting, the settings interleaved over
rounds in one process so that drift of the machine hits them alike. A setting's figure is its
training images per second (timm's loader, the optimizer step and the routing statistics
included) and its evaluation images per second, median and range over the rounds; the printed
ratio is against one thread and no worker (the old default). Run it on an idle machine: the load
average before and after is recorded.

    python benchmarks/main_job_threads.py                      # 1/2 threads x 0/1 workers, 3 rounds
    python benchmarks/main_job_threads.py --threads 1 2 --workers 0 1 --rounds 5 --train-images 12800
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import environment, write_json  # noqa: E402

from timm_ddw.train import TrainConfig, train  # noqa: E402

HERE = Path(__file__).resolve().parent


def one_run(threads: int, workers: int, train_images: int, val_images: int, out: Path) -> Dict[str, float]:
    config = TrainConfig(threads=threads, workers=workers, train_subset=train_images, val_subset=val_images,
                         epochs=1, output=str(out))
    metrics = train(config, progress=False)
    epoch = metrics['history'][0]
    return dict(train_img_per_s=epoch['train_img_per_s'], val_img_per_s=epoch['val_img_per_s'],
                total_time_s=metrics['total_time_s'])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--threads', type=int, nargs='+', default=[1, 2])
    p.add_argument('--workers', type=int, nargs='+', default=[0, 1])
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--train-images', type=int, default=7680, help='60 steps of 128')
    p.add_argument('--val-images', type=int, default=2000)
    p.add_argument('--json', type=Path, default=HERE / 'results' / 'main_job_threads.json')
    args = p.parse_args()

    settings: List[Tuple[int, int]] = list(itertools.product(args.threads, args.workers))
    runs: Dict[str, List[Dict[str, float]]] = {f'{t}t{w}w': [] for t, w in settings}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = settings if r % 2 == 0 else settings[::-1]
            for t, w in order:
                res = one_run(t, w, args.train_images, args.val_images, Path(tmp) / f'r{r}-{t}t{w}w')
                runs[f'{t}t{w}w'].append(res)
                print(f'round {r + 1}: {t} threads, {w} workers: train {res["train_img_per_s"]:.0f} img/s, '
                      f'val {res["val_img_per_s"]:.0f} img/s', flush=True)
    load_after = os.getloadavg()

    base = f'{settings[0][0]}t{settings[0][1]}w'
    summary = {}
    print(f'\nload average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min)')
    print('setting | train img/s median (min-max) | vs base | val img/s median | vs base')
    for key, rs in runs.items():
        tr = [x['train_img_per_s'] for x in rs]
        va = [x['val_img_per_s'] for x in rs]
        ratios = [a['train_img_per_s'] / b['train_img_per_s'] for a, b in zip(rs, runs[base])]
        summary[key] = dict(train_img_per_s=statistics.median(tr), train_min=min(tr), train_max=max(tr),
                            val_img_per_s=statistics.median(va), train_vs_base=statistics.median(ratios),
                            val_vs_base=statistics.median(a['val_img_per_s'] / b['val_img_per_s']
                                                          for a, b in zip(rs, runs[base])),
                            # the default job's three epochs of 60,000 images at this rate
                            main_job_train_min=3 * 60000 / statistics.median(tr) / 60)
        s = summary[key]
        print(f'{key} | {s["train_img_per_s"]:.0f} ({min(tr):.0f}-{max(tr):.0f}) | {s["train_vs_base"]:.2f}x | '
              f'{s["val_img_per_s"]:.0f} | {s["val_vs_base"]:.2f}x | '
              f'3 epochs of training ~{s["main_job_train_min"]:.1f} min')
    write_json(args.json, dict(args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                               environment=environment('cpu', 0, 1), load_before=load_before,
                               load_after=load_after, runs=runs, summary=summary, base=base))
    print(f'-> {args.json}')


if __name__ == '__main__':
    main()
