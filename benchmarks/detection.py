"""Does a DDW backbone detect better? The paper's Table 2 question on Fashion-MNIST detection.

Trains torchvision's Faster R-CNN with FPN (``timm_ddw.detection.create_detector``) with a DDW
backbone (``wiring='dynamic'``) and with the chain backbone (``wiring='chain'``: exactly the static
timm network) on the same budget, data and seeds, and reports COCO box AP/AP50/AP75/APs/APm
(pycocotools' COCOeval) on a held-out synthetic test set. Every run's JSON goes to ``--out-dir`` as
soon as it finishes (runs already there are skipped, so an interrupted experiment resumes), then
``<out-dir>.md`` gets the table next to the paper's Table 2, from all JSONs found.

Paired design: for each seed, both variants start from the same weights for everything they share
(the chain detector's initial state dict is loaded into the DDW one; only routers and thresholds
are extra) and see the same images in the same order, so the per-seed difference measures wiring.

CPU default (10 runs, 2 at a time: about 20 min of wall time and 39 min of summed run time on 2
cores, measured 2026-12-01; the results file has the sum): the narrow ResNet-18 of
``benchmarks/ablation.py`` (stem 16, widths 16/32/64/128, 3 blocks per stage, so each stage is a
4-node graph), grey 128x128 canvases, FPN 64 channels, a 256-wide box head, 64 RoIs and 128
anchors sampled per image, 3,200 training images seen once (400 steps of batch 8), SGD lr 0.02 with a
linear warm-up and the 1x schedule's shape (x0.1 at 2/3 and 8/9 of the steps), seeds 0-4; AP on
500 test images. Trained from scratch with live batch norm: there are no Fashion-MNIST-pretrained
backbones, and frozen BN of a random init would pin timm's zero-initialised last BN of each block
at 0. ``--full`` is the GPU protocol (wider backbone, torchvision's default head width and sampling, 20,000 images x 6
epochs, batch 16); it has not been run.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import environment, load_note, recorded_command, run_pending, write_json  # noqa: E402

VARIANTS = {'chain': 'chain', 'dynamic': 'dynamic', 'static': 'static'}  # name -> wiring
ROUTING_KEYS = ('router_weight', 'router_bias', 'tau')
METRICS = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')

PROTOCOLS: Dict[str, Dict[str, Any]] = {
    'cpu': dict(stem_width=16, channels=[16, 32, 64, 128], layers=[3, 3, 3, 3], fpn_channels=64, box_head=256,
                box_batch=64, rpn_batch=128, train_images=3200, epochs=1, batch_size=8, lr=0.02,
                warmup_steps=50, test_images=500, seeds=[0, 1, 2, 3, 4], device='cpu', jobs=2, threads=1),
    'full': dict(stem_width=64, channels=[64, 128, 256, 512], layers=[3, 3, 3, 3], fpn_channels=256, box_head=1024,
                 box_batch=512, rpn_batch=256, train_images=20000, epochs=6, batch_size=16, lr=0.02,
                 warmup_steps=500, test_images=2000, seeds=[0, 1, 2, 3, 4], device='cuda', jobs=1, threads=8),
}


# ---------------------------------------------------------------------------------------- runs

def build_detector(args: argparse.Namespace, variant: str, seed: int) -> torch.nn.Module:
    """The detector of one variant; every variant of a seed draws the same initial weights."""
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.rpn import AnchorGenerator

    from timm_ddw.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD
    from timm_ddw.detection import create_detector

    torch.manual_seed(seed)
    num_classes = 11  # 10 Fashion-MNIST classes and the background
    return create_detector(
        args.model, None, fpn_channels=args.fpn_channels, wiring=VARIANTS[variant],
        backbone_kwargs=dict(in_chans=1, stem_width=args.stem_width, channels=tuple(args.channels),
                             layers=tuple(args.layers)),
        min_size=args.canvas, max_size=args.canvas,
        image_mean=list(FASHION_MNIST_MEAN), image_std=list(FASHION_MNIST_STD),
        # items are 28-64 px: anchors one octave smaller than torchvision's COCO defaults
        rpn_anchor_generator=AnchorGenerator(((16,), (32,), (64,), (128,), (256,)), ((0.5, 1.0, 2.0),) * 5),
        box_head=TwoMLPHead(args.fpn_channels * 7 * 7, args.box_head),
        box_predictor=FastRCNNPredictor(args.box_head, num_classes),
        rpn_batch_size_per_image=args.rpn_batch, box_batch_size_per_image=args.box_batch,
        rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=500,
        rpn_pre_nms_top_n_test=500, rpn_post_nms_top_n_test=300)


def paired_init(args: argparse.Namespace, variant: str, seed: int) -> torch.nn.Module:
    """Build ``variant`` and give it the chain detector's initial weights for every key they share."""
    det = build_detector(args, variant, seed)
    if variant != 'chain':
        result = det.load_state_dict(build_detector(args, 'chain', seed).state_dict(), strict=False)
        extra = [k for k in result.missing_keys if k.rpartition('.')[2] not in ROUTING_KEYS]
        if extra or result.unexpected_keys:
            raise RuntimeError(f'{variant} and chain differ beyond routing: {extra + result.unexpected_keys}')
    return det


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Detectron2's 1x shape: linear warm-up from 0.001, then x0.1 at 2/3 and 8/9 of the steps."""
    factor = 0.1 ** sum(step >= int(total * f) for f in (2 / 3, 8 / 9))
    if step < warmup:
        factor *= 0.001 + (1 - 0.001) * step / warmup
    return factor


def backbone_macs(det: torch.nn.Module, canvas: int) -> int:
    """Multiply-adds of the backbone and FPN on one canvas (convolutions and matmuls, as the paper counts)."""
    from torch.utils.flop_counter import FlopCounterMode
    det.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        det.backbone(torch.zeros(1, 1, canvas, canvas))
    return fc.get_total_flops() // 2


def routing_summary(det: torch.nn.Module, dataset: Any, device: str) -> Optional[Dict[str, Any]]:
    """Per-stage routing over the test images (DDW only): do different images take different paths?"""
    from timm_ddw.capture import graph_stages
    from timm_ddw.detection import collect_detector_routing, detection_collate
    stages = graph_stages(det.backbone.body)
    if not stages or all(s.router_bias is None for s in stages.values()):
        return None
    loader = torch.utils.data.DataLoader(dataset, batch_size=50, collate_fn=detection_collate)
    stats = collect_detector_routing(det, loader, device=device, progress=False)
    out = {}
    for name in stats.stage_names:
        s = stats.stage(name)
        summary = stats.stage_summary(name)
        out[name] = dict(mean_edge_weight=summary['mean_edge_weight'], closed_share=summary['closed_share'],
                         nodes_removed_share=summary['nodes_removed_share'],
                         mean_std_over_images=float(np.nanmean(s['std'])))
    return out


def run_one(args: argparse.Namespace, variant: str, seed: int) -> Dict[str, Any]:
    """Train one (variant, seed) and return its record."""

    from timm_ddw.detection import FashionMnistDetection, detection_collate, evaluate_coco

    torch.set_num_threads(args.threads)
    device = args.device
    train = FashionMnistDetection(args.train_images, 'train', seed=0, canvas_size=args.canvas, root=args.data_dir)
    test = FashionMnistDetection(args.test_images, 'test', seed=1, canvas_size=args.canvas, root=args.data_dir)
    det = paired_init(args, variant, seed)
    params = sum(p.numel() for p in det.parameters())
    macs = backbone_macs(det, args.canvas)
    det.to(device).train()
    routing = [p for n, p in det.named_parameters() if p.requires_grad and n.rpartition('.')[2] in ROUTING_KEYS]
    decayed = [p for n, p in det.named_parameters() if p.requires_grad and n.rpartition('.')[2] not in ROUTING_KEYS]
    # routers and thresholds without weight decay, as the DDW models' no_weight_decay() says
    opt = torch.optim.SGD([dict(params=decayed, weight_decay=args.weight_decay),
                           dict(params=routing, weight_decay=0.0)], lr=args.lr, momentum=0.9)
    steps_per_epoch = len(train) // args.batch_size
    total = steps_per_epoch * args.epochs
    if args.max_steps:
        total = min(total, args.max_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, args.warmup_steps))
    gen = torch.Generator().manual_seed(seed)
    curve: List[Dict[str, float]] = []
    window: Dict[str, List[float]] = {}
    step = 0
    t0 = time.perf_counter()
    while step < total:
        perm = torch.randperm(len(train), generator=gen)[:steps_per_epoch * args.batch_size]
        for idx in perm.view(-1, args.batch_size)[:total - step].tolist():
            images, targets = detection_collate([train[i] for i in idx])
            losses = det([im.to(device) for im in images], [{k: v.to(device) for k, v in t.items()} for t in targets])
            loss = sum(losses.values())
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f'[{variant} seed {seed}] non-finite loss at step {step}: {losses}')
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            for k, v in losses.items():
                window.setdefault(k, []).append(v.item())
            if step % args.log_every == 0 or step == total:
                curve.append(dict(step=step, lr=opt.param_groups[0]['lr'], seconds=time.perf_counter() - t0,
                                  **{k: float(np.mean(v)) for k, v in window.items()}))
                window = {}
                print(f"[{variant} seed {seed}] step {step}/{total} loss "
                      f"{sum(v for k, v in curve[-1].items() if k.startswith('loss')):.3f} "
                      f"({curve[-1]['seconds']:.0f}s)", flush=True)
    train_time = time.perf_counter() - t0
    t1 = time.perf_counter()
    coco = evaluate_coco(det, test, batch_size=50, device=device)
    eval_time = time.perf_counter() - t1
    print(f"[{variant} seed {seed}] AP {coco['AP']:.2f} AP50 {coco['AP50']:.2f} ({train_time + eval_time:.0f}s)",
          flush=True)
    return dict(
        variant=variant, wiring=VARIANTS[variant], seed=seed, model=args.model,
        backbone_args=dict(in_chans=1, stem_width=args.stem_width, channels=args.channels, layers=args.layers),
        params=params, backbone_fpn_macs=macs, coco={k: coco[k] for k in METRICS}, detections=coco['detections'],
        coco_summary=coco['summary'], routing=routing_summary(det, test, device), curve=curve,
        train_time_s=train_time, eval_time_s=eval_time,
        budget=dict(train_images=len(train), test_images=len(test), canvas=args.canvas, epochs=args.epochs,
                    steps=total, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                    warmup_steps=args.warmup_steps, fpn_channels=args.fpn_channels, box_head=args.box_head,
                    box_batch=args.box_batch, rpn_batch=args.rpn_batch),
        env=environment(device, args.threads, args.jobs),
        finished=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
    )


def _worker(args: argparse.Namespace, variant: str, seed: int) -> str:
    return str(write_json(Path(args.out_dir) / f'{variant}_seed{seed}.json', run_one(args, variant, seed)))


# ---------------------------------------------------------------------------------------- report

T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}  # two-sided 5%, by dof


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), (float(a.std(ddof=1)) if len(a) > 1 else float('nan'))


def paired_difference(a: Dict[int, float], b: Dict[int, float]) -> Dict[str, Any]:
    """Mean of the per-seed differences a - b over common seeds, its std and 95% t-interval."""
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    if not d:
        return dict(seeds=[], mean=float('nan'), std=float('nan'), lo=float('nan'), hi=float('nan'))
    m, s = mean_std(d)
    half = T95.get(len(d) - 1, 1.96) * s / math.sqrt(len(d)) if len(d) > 1 else float('nan')
    return dict(seeds=seeds, diffs=d, mean=m, std=s, lo=m - half, hi=m + half)


def _fmt(v: Optional[float], sign: str = '') -> str:
    return '-' if v is None or not math.isfinite(v) else f'{v:{sign}.2f}'


def paper_rows(paper: Dict[str, Any]) -> List[str]:
    t2 = paper['table2_coco_faster_rcnn_fpn_1x']
    cols = t2['columns']
    rows = []
    for backbone in ('resnet50', 'resnet101', 'resnext50_32x4d'):
        base, ddw = t2['rows'][f'{backbone}_baseline'], t2['rows'][f'{backbone}_ddw']
        ap = {c: (base[i], ddw[i]) for i, c in enumerate(cols)}
        rows.append(f"| {backbone} (COCO, paper) | {ap['AP'][0]} | {ap['AP'][1]} | {ap['AP'][1] - ap['AP'][0]:+.2f} | "
                    f"{ap['AP50'][1] - ap['AP50'][0]:+.2f} | {ap['AP75'][1] - ap['AP75'][0]:+.2f} | "
                    f"{ap['APs'][1] - ap['APs'][0]:+.2f} | {ap['APm'][1] - ap['APm'][0]:+.2f} |")
    return rows


def write_report(out_dir: Path, paper: Dict[str, Any], command: str, trial: bool = False) -> Path:
    recs = [json.loads(p.read_text()) for p in sorted(out_dir.glob('*.json'))]
    by: Dict[str, Dict[int, Dict[str, Any]]] = {}
    for r in recs:
        by.setdefault(r['variant'], {})[r['seed']] = r
    md_path = out_dir.parent / f'{out_dir.name}.md'
    lines = ['# Detection: DDW vs chain backbones in Faster R-CNN + FPN (Fashion-MNIST detection)', '']
    if trial:
        lines += ['**TRIAL RUN (`--trial`): a check of timing and that training learns; not a result.**', '']
    lines += ['Generated by `benchmarks/detection.py`; every run\'s JSON (loss curve, COCOeval summary, routing, '
              f'budget, environment) is in [`{out_dir.name}/`]({out_dir.name}/). Command:', '',
              '```', command, '```', '']
    if recs:
        r0 = recs[0]
        b = r0['budget']
        lines += [
            f"Backbone: `{r0['model']}` with `{r0['backbone_args']}`; only `wiring` differs between variants, and "
            "each seed's variants start from the same weights (the chain detector's initial state; the DDW "
            "routers and thresholds are the only extra parameters) and see the same images in the same order.",
            f"Data: Fashion-MNIST detection (`timm_ddw.detection.FashionMnistDetection`), {b['canvas']}x{b['canvas']} "
            f"grey canvases with 1-4 items of 28-64 px; {b['train_images']} training images (seed 0, items from "
            f"Fashion-MNIST's training split), {b['test_images']} test images (seed 1, items from its test split).",
            f"Budget per run: {b['steps']} steps of batch {b['batch_size']} ({b['epochs']} epoch(s)), SGD momentum "
            f"0.9, lr {b['lr']} with {b['warmup_steps']} warm-up steps and x0.1 at 2/3 and 8/9 of the steps (the 1x "
            f"schedule's shape), weight decay {b['weight_decay']} (none on routers and thresholds); FPN "
            f"{b['fpn_channels']} channels, box head {b['box_head']}, {b['box_batch']} RoIs and {b['rpn_batch']} "
            "anchors sampled per image; trained from scratch with live batch norm (no Fashion-MNIST-pretrained "
            "backbone exists; the paper fine-tunes ImageNet-trained backbones with frozen BN).",
            f"Device: {r0['env']['device']}, {r0['env']['threads']} thread(s) per run, {r0['env']['jobs']} run(s) "
            f"in parallel on a {r0['env']['host_cpus']}-core machine ({load_note([r['env'] for r in recs])}). "
            "Sum of run times: "
            f"{sum(r['train_time_s'] + r['eval_time_s'] for r in recs) / 60:.0f} min for {len(recs)} runs. Code: "
            + ', '.join(sorted({f"`{r['env'].get('commit') or 'unknown'}`" for r in recs})) + '.', '']
    lines += ['| variant | seeds | params | backbone+FPN MACs (M) | AP | AP50 | AP75 | APs | APm | '
              'train time (s, mean) |', '|---|---|---|---|---|---|---|---|---|---|']
    for name in VARIANTS:
        rs = list(by.get(name, {}).values())
        if not rs:
            continue
        cells = []
        for m in ('AP', 'AP50', 'AP75', 'APs', 'APm'):
            vals = [r['coco'][m] for r in rs if r['coco'][m] is not None]
            mu, sd = mean_std(vals) if vals else (float('nan'), float('nan'))
            cells.append(f'{_fmt(mu)} ± {_fmt(sd)}')
        lines.append(f"| {name} | {len(rs)} | {rs[0]['params']:,} | {rs[0]['backbone_fpn_macs'] / 1e6:.1f} | "
                     + ' | '.join(cells) + f" | {np.mean([r['train_time_s'] for r in rs]):.0f} |")
    lines += ['', 'Mean ± std over seeds (COCO AP in percent; no object is large, so APl is undefined). Per-seed AP: '
              + '; '.join(f"{n}: " + ', '.join(f"{by[n][s]['coco']['AP']:.2f}" for s in sorted(by[n]))
                          for n in VARIANTS if n in by), '']
    lines += ['## DDW minus chain, next to the paper\'s Table 2', '',
              'Here: mean of the per-seed differences (paired by seed) and its 95% t-interval. Paper: COCO minival, '
              'Faster R-CNN + FPN, Detectron2 1x, ImageNet-trained backbones, one run each.', '',
              '| backbone | chain / baseline AP | DDW AP | Δ AP | Δ AP50 | Δ AP75 | Δ APs | Δ APm |',
              '|---|---|---|---|---|---|---|---|']
    diff = None
    if 'dynamic' in by and 'chain' in by:
        ds = {m: paired_difference({s: r['coco'][m] for s, r in by['dynamic'].items() if r['coco'][m] is not None},
                                   {s: r['coco'][m] for s, r in by['chain'].items() if r['coco'][m] is not None})
              for m in ('AP', 'AP50', 'AP75', 'APs', 'APm')}
        diff = ds['AP']
        ap_c = mean_std([by['chain'][s]['coco']['AP'] for s in diff['seeds']])[0]
        ap_d = mean_std([by['dynamic'][s]['coco']['AP'] for s in diff['seeds']])[0]
        cell = {m: f"{_fmt(d['mean'], '+')} [{_fmt(d['lo'], '+')}, {_fmt(d['hi'], '+')}]" for m, d in ds.items()}
        lines.append(f"| {recs[0]['model']} narrow (Fashion-MNIST, {len(diff['seeds'])} seed(s)) | {ap_c:.2f} | "
                     f"{ap_d:.2f} | {cell['AP']} | {cell['AP50']} | {cell['AP75']} | {cell['APs']} | {cell['APm']} |")
    lines += paper_rows(paper) + ['']
    lines += ['## Reading', ''] + reading(by, diff, paper) + ['']
    md_path.write_text('\n'.join(lines))
    return md_path


def reading(by: Dict[str, Dict[int, Dict[str, Any]]], diff: Optional[Dict[str, Any]],
            paper: Dict[str, Any]) -> List[str]:
    """Plain statements the numbers support, and what they cannot say."""
    out = []
    if diff is None or not diff['seeds']:
        return ['- Not enough runs for a comparison yet (both chain and dynamic are needed).']
    n = len(diff['seeds'])
    t2 = paper['table2_coco_faster_rcnn_fpn_1x']['rows']
    gains = sorted(t2[f'{b}_ddw'][1] - t2[f'{b}_baseline'][1] for b in ('resnet50', 'resnet101', 'resnext50_32x4d'))
    if n < 2:
        out.append(f'- One seed only: DDW - chain = {diff["mean"]:+.2f} AP, with no estimate of the seed spread.')
    elif diff['lo'] > 0:
        out.append(f"- DDW beats chain by {diff['mean']:+.2f} AP (95% interval {diff['lo']:+.2f} to "
                   f"{diff['hi']:+.2f}, {n} paired seeds): the direction of the paper's Table 2.")
    elif diff['hi'] < 0:
        out.append(f"- DDW is below chain by {diff['mean']:+.2f} AP (95% interval {diff['lo']:+.2f} to "
                   f"{diff['hi']:+.2f}, {n} paired seeds): against the direction of the paper's Table 2.")
    else:
        out.append(f"- DDW - chain = {diff['mean']:+.2f} AP, 95% interval {diff['lo']:+.2f} to {diff['hi']:+.2f} "
                   f"over {n} paired seeds: this budget does not resolve a difference in either direction.")
    if n >= 2 and diff['hi'] < gains[0]:
        out.append(f"- The interval excludes gains as large as the paper's (+{gains[0]:.2f} to +{gains[-1]:.2f} AP): "
                   'a gain of that size did not appear at this scale.')
    elif n >= 2:
        out.append(f"- The interval does not exclude gains of the paper's size (+{gains[0]:.2f} to "
                   f"+{gains[-1]:.2f} AP).")
    dyn = [r['routing'] for r in by.get('dynamic', {}).values() if r.get('routing')]
    if dyn:
        stages = sorted(dyn[0])
        spread = {s: np.mean([d[s]['mean_std_over_images'] for d in dyn]) for s in stages}
        closed = {s: np.mean([d[s]['closed_share'] for d in dyn]) for s in stages}
        out.append('- Routing of the trained DDW backbones over the test images (mean over seeds): std of an edge '
                   'weight across images ' + ', '.join(f'{s} {spread[s]:.3f}' for s in stages)
                   + '; share of closed edges ' + ', '.join(f'{s} {100 * closed[s]:.1f}%' for s in stages)
                   + '. A std near 0 means every image takes the same path.')
    out.append("- What this does not say: the paper fine-tunes ImageNet-trained ResNet-50/101/ResNeXt-50 backbones on "
               "COCO (118k images, 80 classes, 800x1333 px, 90k steps of batch 16, frozen BN); this trains a narrow "
               "ResNet-18 from scratch on a few thousand synthetic 128x128 grey images with disjoint items, for a few "
               "hundred steps. AP points here and on COCO are not on one scale; agreement is weak support and "
               "disagreement weak evidence against the paper's claim. A difference within the interval means this "
               "budget cannot resolve it, not that the backbones are equal.")
    return out


# ---------------------------------------------------------------------------------------- main

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--full', action='store_true', help='the GPU protocol (see the module docstring)')
    p.add_argument('--variants', nargs='+', default=['chain', 'dynamic'], choices=list(VARIANTS))
    p.add_argument('--seeds', nargs='+', type=int)
    p.add_argument('--model', default='ddw_resnet18')
    p.add_argument('--layers', nargs=4, type=int, help='blocks per stage')
    p.add_argument('--channels', nargs=4, type=int, help='stage widths')
    p.add_argument('--stem-width', type=int)
    p.add_argument('--fpn-channels', type=int)
    p.add_argument('--box-head', type=int, help='width of the two-layer box head')
    p.add_argument('--box-batch', type=int, help='RoIs sampled per image for the box head')
    p.add_argument('--rpn-batch', type=int, help='anchors sampled per image for the RPN')
    p.add_argument('--canvas', type=int, default=128)
    p.add_argument('--train-images', type=int)
    p.add_argument('--test-images', type=int)
    p.add_argument('--epochs', type=int)
    p.add_argument('--max-steps', type=int, default=0, help='cap on the training steps (0: all epochs)')
    p.add_argument('--batch-size', type=int)
    p.add_argument('--lr', type=float)
    p.add_argument('--weight-decay', type=float, default=1e-4)
    p.add_argument('--warmup-steps', type=int)
    p.add_argument('--log-every', type=int, default=25)
    p.add_argument('--device')
    p.add_argument('--threads', type=int, help='torch threads per run')
    p.add_argument('--jobs', type=int, help='runs in parallel (processes)')
    p.add_argument('--data-dir', default='/usr/share/datasets/fashion-mnist')
    p.add_argument('--out-dir', default=str(Path(__file__).parent / 'results' / 'detection'))
    p.add_argument('--paper', default=str(Path(__file__).parent / 'paper_tables.json'))
    p.add_argument('--trial', action='store_true', help='mark the report as a trial, not a result')
    p.add_argument('--report-only', action='store_true', help='only rewrite the table from the JSONs')
    args = p.parse_args(argv)
    for key, value in PROTOCOLS['full' if args.full else 'cpu'].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in ('train_images', 'test_images', 'epochs', 'batch_size', 'jobs', 'threads', 'log_every'):
        if getattr(args, name) < 1:
            raise SystemExit(f'--{name.replace("_", "-")} must be >= 1')
    if args.train_images < args.batch_size:
        raise SystemExit('--train-images must be at least --batch-size')
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = recorded_command(out_dir.parent / f'{out_dir.name}.md', 'detection.py', argv, args.report_only)
    paper = json.loads(Path(args.paper).read_text())
    if not args.report_only:
        run_pending([(v, s) for s in args.seeds for v in args.variants],
                    lambda r: (out_dir / f'{r[0]}_seed{r[1]}.json').exists(), _worker, args, args.jobs,
                    lambda: write_report(out_dir, paper, command, args.trial))
    print('wrote', write_report(out_dir, paper, command, args.trial))
    return 0


if __name__ == '__main__':
    sys.exit(main())
