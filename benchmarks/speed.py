"""Training-step and inference throughput and peak memory: DDW model vs its timm twin, side by side.

The variants run interleaved in one process, several alternating rounds (the order rotates every
round), so machine noise hits all of them alike:
  static     timm's twin (e.g. resnet50)
  ddw        the DDW model as the library runs it (in eager training: the feature buffer; in
             inference: blocked sums in stages of more than 12 blocks)
  ddw-nobuf  the same DDW model without the feature buffer and blocked sums
             (``stage.use_buffer = False``, ``stage.sum_block_size = 0``): the library's per-node
             ``timm_ddw.graph.weighted_sum``, under plain autograd in training
  ddw-loop   the same DDW model without the buffer and with a plain per-edge loop swapped in for
             the weighted sums (``timm_ddw.graph.weighted_sum_loop``: one multiply and one add per
             edge, a new tensor each), the reference point.
  ddw-fused  with --compile on the CPU: the same DDW model with its sums through the opt-in
             ``timm_ddw::weighted_sum`` operator instead of inductor's own kernels
             (``fused.set_enabled(True)``; the model compiles a second time, for this variant)
  ddw-learned  where the cost goes, part 1: the DDW model built with ``wiring='static'`` (one
             learned weight per edge): every node's sum, no routers (its own model and weights)
  ddw-chain  part 2: ``wiring='chain'``, each node fed by its predecessor alone (no sums, no
             routers): the graph stage's own cost, the twin's computation otherwise
             (ddw-chain -> ddw-learned -> ddw: what the sums, then the routers add)
Ratios are DDW/static: the median over rounds of each round's ratio, with min and max.

Peak memory of one training step (and of one inference batch):
  cuda: ``torch.cuda.max_memory_allocated`` (tensors; allocator cache excluded), in process;
  cpu:  torch has no CPU allocator statistics, so each figure comes from a fresh subprocess that
        builds the model, runs one warm-up step, resets the kernel's peak-RSS counter
        (``/proc/self/clear_refs`` <- 5) and reads ``VmHWM`` after one more step. glibc is told to
        serve every allocation over 64 KiB with mmap (``MALLOC_MMAP_THRESHOLD_``), so freed tensors
        leave RSS at once and the peak is the tensors' peak. The figure is VmHWM minus the RSS after
        imports: weights, gradients, optimizer state, activations.

    python benchmarks/speed.py --model ddw_resnet50 --batch-size 32 --rounds 5
    python benchmarks/speed.py --device cuda --batch-size 128 --amp-dtype bfloat16 --channels-last [--compile]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm_ddw
import timm_ddw.graph as graph
from timm_ddw import fused
from timm_ddw.models import TWINS

HERE = Path(__file__).resolve().parent

VARIANTS = ('static', 'ddw', 'ddw-nobuf', 'ddw-loop', 'ddw-fused', 'ddw-learned', 'ddw-chain')
# variants that are models of their own: the DDW model under another wiring
WIRING_VARIANTS = {'ddw-learned': 'static', 'ddw-chain': 'chain'}
MODES = ('train', 'infer')
AMP_DTYPES = {'none': None, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


loop_weighted_sum = graph.weighted_sum_loop  # one multiply and one add per edge


LIBRARY_WEIGHTED_SUM = graph.weighted_sum
REFERENCE_WEIGHTED_SUM: Callable = loop_weighted_sum


@contextlib.contextmanager
def variant_setup(variant: str, model: Optional[nn.Module] = None):
    """Configure the graph stages for a variant; the stage looks ``weighted_sum`` up at call time."""
    stages = [] if model is None else [m for m in model.modules() if isinstance(m, graph.GraphStage)]
    saved = [(getattr(m, 'use_buffer', None), getattr(m, 'sum_block_size', None)) for m in stages]
    if variant in ('ddw-nobuf', 'ddw-loop'):
        for m in stages:
            if hasattr(m, 'use_buffer'):
                m.use_buffer = False
            if hasattr(m, 'sum_block_size'):
                m.sum_block_size = 0
    graph.weighted_sum = REFERENCE_WEIGHTED_SUM if variant == 'ddw-loop' else LIBRARY_WEIGHTED_SUM
    fused_on = fused.enabled()
    fused.set_enabled(variant == 'ddw-fused')
    try:
        yield
    finally:
        graph.weighted_sum = LIBRARY_WEIGHTED_SUM
        fused.set_enabled(fused_on)
        for m, (use_buffer, block_size) in zip(stages, saved, strict=True):
            if use_buffer is not None:
                m.use_buffer = use_buffer
            if block_size is not None:
                m.sum_block_size = block_size


class Bench:
    """One model (static twin or DDW) with its optimizer, inputs and step functions."""

    def __init__(self, name: str, args: argparse.Namespace, device: torch.device, wiring: Optional[str] = None):
        torch.manual_seed(0)
        kw = dict(features_only=True) if args.features_only else dict(num_classes=1000)
        if name.startswith('ddw_') and args.aggregation:
            kw['aggregation'] = args.aggregation
        if name.startswith('ddw_') and (wiring or args.wiring):
            kw['wiring'] = wiring or args.wiring
        self.model = timm.create_model(name, **kw).to(device)
        self.model.set_grad_checkpointing(args.grad_checkpointing)
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        self.model = self.model.to(memory_format=fmt)
        self.x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device).to(memory_format=fmt)
        self.y = torch.randint(0, 1000, (args.batch_size,), device=device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-4, momentum=0.9)
        self.amp = AMP_DTYPES[args.amp_dtype]
        self.device = device
        self.scaler = torch.amp.GradScaler(device.type) if self.amp is torch.float16 else None
        self.fn: nn.Module = self.model
        if args.compile:
            self.fn = torch.compile(self.model, fullgraph=True, backend=args.compile_backend)

    def autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    def train_step(self) -> torch.Tensor:
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        with self.autocast():
            out = self.fn(self.x)
            # features_only: the feature maps' mean squares stand in for a task loss
            loss = sum(o.float().square().mean() for o in out) if isinstance(out, list) \
                else F.cross_entropy(out, self.y)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()
        return loss.detach()

    def infer_step(self) -> torch.Tensor:
        self.model.eval()
        with torch.inference_mode(), self.autocast():
            return self.fn(self.x)

    def step(self, mode: str) -> torch.Tensor:
        """One training step (returns the loss) or inference batch (returns the output)."""
        return self.train_step() if mode == 'train' else self.infer_step()


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def throughput(bench: Bench, mode: str, variant: str, steps: int, warmup: int) -> float:
    with variant_setup(variant, bench.model):
        for _ in range(warmup):
            bench.step(mode)
        _sync(bench.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            bench.step(mode)
        _sync(bench.device)
        dt = time.perf_counter() - t0
    return steps * bench.x.shape[0] / dt


def cuda_peak_mib(bench: Bench, mode: str, variant: str) -> float:
    with variant_setup(variant, bench.model):
        bench.step(mode)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        bench.step(mode)
        torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2 ** 20


def _proc_status_kb(key: str) -> int:
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(key + ':'):
            return int(line.split()[1])
    raise RuntimeError(f'{key} not in /proc/self/status')


def cpu_peak_child(args: argparse.Namespace) -> Dict[str, float]:
    """Runs in a fresh process: peak RSS of one step above the RSS after imports (see module doc)."""
    variant, mode = args.memory_child
    base_kb = _proc_status_kb('VmRSS')
    name = TWINS[args.model] if variant == 'static' else args.model
    bench = Bench(name, args, torch.device('cpu'), WIRING_VARIANTS.get(variant))
    with variant_setup(variant, bench.model):
        bench.step(mode)
        Path('/proc/self/clear_refs').write_text('5')
        before_kb = _proc_status_kb('VmRSS')
        bench.step(mode)
        peak_kb = _proc_status_kb('VmHWM')
    return dict(peak_mib=(peak_kb - base_kb) / 1024, step_mib=(peak_kb - before_kb) / 1024,
                rss_after_imports_mib=base_kb / 1024, vmhwm_mib=peak_kb / 1024)


def cpu_peak_mib(args: argparse.Namespace, mode: str, variant: str) -> Dict[str, float]:
    cmd = [sys.executable, os.path.abspath(__file__), '--memory-child', variant, mode] + args.argv
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='65536')
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f'memory subprocess failed ({" ".join(cmd)}):\n{res.stderr[-2000:]}')
    return json.loads(res.stdout.strip().splitlines()[-1])


def _stats(values: List[float]) -> Dict[str, float]:
    return dict(median=statistics.median(values), min=min(values), max=max(values), values=values)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--model', default='ddw_resnet50', choices=list(TWINS))
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--amp-dtype', default='none', choices=list(AMP_DTYPES))
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--compile', action='store_true', help='torch.compile(model, fullgraph=True)')
    p.add_argument('--compile-backend', default='inductor')
    p.add_argument('--grad-checkpointing', action='store_true', help='model.set_grad_checkpointing()')
    p.add_argument('--aggregation', default=None, choices=list(graph.AGGREGATIONS),
                   help="the DDW model's aggregation (default: the library's, 'bounded')")
    p.add_argument('--wiring', default=None, choices=list(graph.WIRINGS),
                   help="the DDW model's wiring (default 'dynamic'; 'static': the sums without routers)")
    p.add_argument('--features-only', action='store_true', help='timm features_only models (default feature_cls)')
    p.add_argument('--rounds', type=int, default=5, help='alternating rounds (median and spread over them)')
    p.add_argument('--steps', type=int, default=5, help='timed steps per variant and round')
    p.add_argument('--warmup', type=int, default=1, help='untimed steps before each timing (3x in round 1)')
    p.add_argument('--device', default='auto', help="'cpu', 'cuda' or 'auto' (cuda when present)")
    p.add_argument('--threads', type=int, default=0, help='torch CPU threads (0: torch default)')
    p.add_argument('--modes', nargs='+', default=list(MODES), choices=MODES)
    p.add_argument('--variants', nargs='+', default=[v for v in VARIANTS if v not in WIRING_VARIANTS],
                   choices=VARIANTS, help='variants to run (static is always run: the ratios need it; '
                   'default: all but the wiring variants)')
    p.add_argument('--no-reference', action='store_true', help='skip the ddw-loop reference variant')
    p.add_argument('--no-memory', action='store_true')
    p.add_argument('--json', default=None, help='default: benchmarks/results/speed_<device>_<model>_....json')
    p.add_argument('--memory-child', nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key in ('batch_size', 'img_size', 'rounds', 'steps'):
        if getattr(args, key) <= 0:
            p.error(f'--{key.replace("_", "-")}={getattr(args, key)} must be positive')
    if args.device not in ('auto', 'cpu', 'cuda'):
        p.error(f"--device={args.device!r} is not one of 'auto', 'cpu', 'cuda'")
    if args.device == 'cuda' and not torch.cuda.is_available():
        p.error('--device=cuda but torch.cuda.is_available() is False')
    # everything but the memory-child flag, to hand to the memory subprocesses
    raw = list(sys.argv[1:] if argv is None else argv)
    if '--memory-child' in raw:
        i = raw.index('--memory-child')
        del raw[i:i + 3]
    args.argv = raw
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(cpu_peak_child(args)))
        return 0
    device = torch.device('cuda' if args.device == 'cuda' or (args.device == 'auto' and torch.cuda.is_available())
                          else 'cpu')
    twin = TWINS[args.model]
    benches = {'static': Bench(twin, args, device), 'ddw': Bench(args.model, args, device)}
    has_buffer = any(hasattr(m, 'use_buffer') for m in benches['ddw'].model.modules())
    variants = [v for v in VARIANTS if v == 'static' or (
        v in args.variants and not (args.no_reference and v == 'ddw-loop') and (has_buffer or v != 'ddw-nobuf')
        and (v != 'ddw-fused' or (args.compile and device.type == 'cpu')))]
    for v in variants[1:]:
        # same model and weights, configured by variant_setup; the wiring variants build their own
        benches[v] = Bench(args.model, args, device, WIRING_VARIANTS[v]) if v in WIRING_VARIANTS else benches['ddw']
    ref_name = getattr(REFERENCE_WEIGHTED_SUM, '__module__', '') + '.' + REFERENCE_WEIGHTED_SUM.__name__
    print(f'{args.model} vs {twin} on {device} ({torch.get_num_threads()} threads), batch {args.batch_size}, '
          f'{args.img_size}px, amp={args.amp_dtype}, channels_last={args.channels_last}, compile={args.compile}; '
          f'reference: {ref_name}', flush=True)

    tput = {m: {v: [] for v in variants} for m in args.modes}
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for mode in args.modes:
            for v in order:
                warm = args.warmup * (3 if r == 0 else 1)
                tput[mode][v].append(throughput(benches[v], mode, v, args.steps, warm))
        print(f'round {r + 1}/{args.rounds}: ' + ', '.join(
            f'{m} {v} {tput[m][v][-1]:.1f}' for m in args.modes for v in variants) + ' img/s', flush=True)

    memory: Dict[str, Dict[str, Dict[str, float]]] = {}
    if not args.no_memory:
        for mode in args.modes:
            memory[mode] = {}
            for v in variants:
                if device.type == 'cuda':
                    memory[mode][v] = dict(peak_mib=cuda_peak_mib(benches[v], mode, v))
                else:
                    memory[mode][v] = cpu_peak_mib(args, mode, v)

    results = dict(
        model=args.model, twin=twin, device=str(device), device_name=torch.cuda.get_device_name(device)
        if device.type == 'cuda' else platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(), threads=torch.get_num_threads(), torch=torch.__version__, timm=timm.__version__,
        timm_ddw=getattr(timm_ddw, '__version__', None), reference=ref_name,
        date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
        args={k: v for k, v in vars(args).items() if k not in ('argv', 'memory_child')},
        memory_method='cuda.max_memory_allocated' if device.type == 'cuda'
        else 'fresh subprocess, VmHWM after clear_refs, minus RSS after imports, MALLOC_MMAP_THRESHOLD_=65536',
        throughput={}, ratios={}, memory=memory, memory_ratios={})
    print()
    print(f'{"mode":6} {"variant":10} {"img/s median":>13} {"min-max":>15} {"ratio/static":>13} {"ratio min-max":>14}'
          f' {"peak MiB":>9} {"mem ratio":>9}')
    for mode in args.modes:
        results['throughput'][mode] = {v: _stats(tput[mode][v]) for v in variants}
        results['ratios'][mode] = {}
        results['memory_ratios'][mode] = {}
        for v in variants:
            s = results['throughput'][mode][v]
            ratio = _stats([a / b for a, b in zip(tput[mode][v], tput[mode]['static'], strict=True)])
            results['ratios'][mode][v] = ratio
            mem = memory.get(mode, {}).get(v, {}).get('peak_mib')
            mem_ratio = None if mem is None else mem / memory[mode]['static']['peak_mib']
            results['memory_ratios'][mode][v] = mem_ratio
            print(f'{mode:6} {v:10} {s["median"]:13.1f} {s["min"]:7.1f}-{s["max"]:<7.1f} {ratio["median"]:13.3f} '
                  f'{ratio["min"]:6.3f}-{ratio["max"]:<7.3f} {"-" if mem is None else f"{mem:9.0f}":>9} '
                  f'{"-" if mem_ratio is None else f"{mem_ratio:9.3f}":>9}')
    print(f'\nratio = DDW img/s / static img/s, per round (median, min-max over {args.rounds} rounds); '
          f'peak MiB: {results["memory_method"]}')

    if args.json is None:
        tag = f'speed_{device.type}_{args.model}_b{args.batch_size}_{args.img_size}'
        tag += ''.join([f'_{args.amp_dtype}' if args.amp_dtype != 'none' else '',
                        '_cl' if args.channels_last else '', '_compile' if args.compile else '',
                        '_features' if args.features_only else '', '_ckpt' if args.grad_checkpointing else '',
                        f'_{args.aggregation}' if args.aggregation else '',
                        f'_{args.wiring}' if args.wiring else ''])
        args.json = str(HERE / 'results' / f'{tag}.json')
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    print(f'wrote {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
