"""Batch-1 inference latency: dense eval forward vs ``set_skip_closed`` (removed nodes skipped).

Thresholds are set so that a chosen share of each stage's edges is closed on calibration images:
every stage's thresholds take the same value, the ``--close-share`` quantile of its open-edge
weights (``router_bias`` 0 spreads the weights, so the quantile is meaningful). A node is removed,
and its block skipped, only when all its input edges are closed, so the gain is far smaller than
the share of closed edges. Inputs are random images: the figures describe the mechanism, not a
trained model's routing. Outputs of the two modes are checked to be identical.

    python benchmarks/skip_closed.py --model ddw_resnet50 --close-share 0.5 0.75 0.9
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import timm
import torch

import timm_ddw


def calibrate(model: torch.nn.Module, x: torch.Tensor, share: float) -> None:
    """Per stage, one threshold for all nodes: the ``share`` quantile of its edge weights on ``x``."""
    stages = timm_ddw.graph_stages(model)
    for stage in stages.values():
        stage.tau.data.zero_()
    with torch.no_grad(), timm_ddw.capture_routing(model) as cap:
        model(x)
    for name, stage in stages.items():
        adj = cap[name][0]
        edges = torch.ones(adj.shape[1:], dtype=torch.bool).tril(-1)
        stage.tau.data.fill_(torch.quantile(adj[:, edges].flatten(), share).item())


def routing_shares(model: torch.nn.Module, xs: torch.Tensor):
    closed = edges = removed = nodes = 0
    with torch.no_grad(), timm_ddw.capture_routing(model) as cap:
        for x in xs:
            model(x[None])
    for mats in cap.values():
        for adj in mats:
            mask = torch.ones(adj.shape[1:], dtype=torch.bool).tril(-1)
            closed += int((adj[:, mask] == 0).sum())
            edges += int(mask.sum()) * adj.shape[0]
            n = adj.shape[1] - 1  # block nodes 1..n-1 can be removed
            removed += int((adj[:, 1:n, :].sum(-1) == 0).sum())
            nodes += (n - 1) * adj.shape[0]
    return closed / edges, removed / max(nodes, 1)


def latency(model: torch.nn.Module, xs: torch.Tensor, rounds: int):
    stages = timm_ddw.graph_stages(model).values()
    times = {False: [], True: []}
    with torch.no_grad():
        for x in xs[:2]:  # warm up
            model(x[None])
        for r in range(rounds):
            for skip in ((False, True) if r % 2 == 0 else (True, False)):
                for s in stages:
                    s.skip_closed = skip
                t = time.perf_counter()
                for x in xs:
                    model(x[None])
                times[skip].append((time.perf_counter() - t) / len(xs) * 1000)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--model', default='ddw_resnet50')
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--close-share', type=float, nargs='+', default=[0.5, 0.75, 0.9])
    p.add_argument('--images', type=int, default=10)
    p.add_argument('--rounds', type=int, default=4)
    p.add_argument('--threads', type=int, default=0)
    p.add_argument('--json', default='benchmarks/results/skip_closed.json')
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model, router_bias=0.0).eval()
    calib = torch.randn(16, 3, args.img_size, args.img_size)
    xs = torch.randn(args.images, 3, args.img_size, args.img_size)
    rows = []
    for share in args.close_share:
        calibrate(model, calib, share)
        closed, removed = routing_shares(model, xs)
        with torch.no_grad():
            timm_ddw.set_skip_closed(model, False)
            dense = [model(x[None]) for x in xs]
            timm_ddw.set_skip_closed(model, True)
            identical = all(torch.equal(model(x[None]), d) for x, d in zip(xs, dense))
        ms = latency(model, xs, args.rounds)
        rows.append(dict(close_share_target=share, closed_edge_share=closed, removed_node_share=removed,
                         dense_ms=ms[False], skip_ms=ms[True], speedup=ms[False] / ms[True], identical=identical))
        print(f'target {share:.2f}: closed edges {closed:.1%}, removed block nodes {removed:.1%} | batch-1 latency '
              f'dense {ms[False]:.1f} ms, skipping {ms[True]:.1f} ms ({ms[False] / ms[True]:.3f}x) | '
              f'outputs identical: {identical}')
    out = dict(model=args.model, img_size=args.img_size, threads=torch.get_num_threads(), torch=torch.__version__,
               rows=rows)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + '\n')


if __name__ == '__main__':
    main()
