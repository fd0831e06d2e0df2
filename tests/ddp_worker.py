"""torchrun worker for tests/test_ddp.py: a DDW model trained the way timm's train.py trains it.

    torchrun --standalone --nproc_per_node=2 tests/ddp_worker.py --out DIR [--node-budget B]

Follows train.py's order on CPU/gloo: ``init_distributed_device``, ``create_model``,
``set_grad_checkpointing``, ``convert_sync_batchnorm``, ``ClassificationTask``,
``create_optimizer_v2``, ``prepare_distributed`` (DDP without find_unused_parameters, buffers
broadcast), ``CheckpointSaver`` and ``resume_task_checkpoint``. The data has an uneven last batch.

torch's SyncBatchNorm refuses CPU tensors in training (and DDP refuses it on CPU modules), so on
CPU its forward is replaced here by the same computation done with autograd-aware all-reduces of
the batch statistics, and DDP's GPU-only check is skipped; the module types, the state dict and
where the layers sit are those of the real conversion.

Rank 0 writes ``result.json`` into DIR.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import timm
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import convert_sync_batchnorm
from timm.optim import create_optimizer_v2
from timm.task import ClassificationTask
from timm.task._helpers import resume_task_checkpoint
from timm.utils import CheckpointSaver, init_distributed_device, random_seed
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import timm_ddw  # noqa: E402,F401

NUM_CLASSES, IMG, BATCH, SAMPLES, EPOCHS, RESUME_EPOCH = 4, 32, 4, 28, 3, 1


def _cpu_sync_bn_forward(self: nn.SyncBatchNorm, x: torch.Tensor) -> torch.Tensor:
    """SyncBatchNorm's training forward for CPU tensors: statistics reduced over the process group."""
    if not (self.training and dist.is_initialized()):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
    dims = [0] + list(range(2, x.dim()))
    count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype)
    stats = torch.cat([x.sum(dims), (x * x).sum(dims), count])
    stats = dist_fn.all_reduce(stats, group=self.process_group or dist.group.WORLD)
    c = x.shape[1]
    n = stats[-1]
    mean = stats[:c] / n
    var = stats[c:2 * c] / n - mean * mean
    with torch.no_grad():
        self.num_batches_tracked.add_(1)
        self.running_mean.lerp_(mean.detach(), self.momentum)
        self.running_var.lerp_(var.detach() * n / (n - 1), self.momentum)
    shape = (1, c) + (1,) * (x.dim() - 2)
    y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
    return y * self.weight.view(shape) + self.bias.view(shape)


def make_data(seed: int = 0):
    """A learnable toy set: one fixed random pattern per class plus noise."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(NUM_CLASSES, 3, IMG, IMG, generator=g)
    y = torch.arange(SAMPLES) % NUM_CLASSES
    x = patterns[y] + 0.5 * torch.randn(SAMPLES, 3, IMG, IMG, generator=g)
    return torch.utils.data.TensorDataset(x, y)


def build(args, device):
    """Model, task, optimizer exactly in train.py's order."""
    random_seed(0, 0)  # same init on every rank, as train.py's seed + DDP broadcast give
    budget = {} if args.node_budget is None else dict(  # routers near 0.5: removal from the first step
        node_budget=args.node_budget, router_bias=0.0, threshold_init=0.45)
    model = timm.create_model('ddw_resnet18', num_classes=NUM_CLASSES, in_chans=3, **budget)
    for stage in timm_ddw.graph_stages(model).values():
        stage.budget_rate = 0.05  # a few steps must move the thresholds
    model.set_grad_checkpointing(enable=True)
    model.to(device)
    bn_group = dist.new_group(backend='gloo')  # sync-bn reduces on its own group, apart from DDP's buckets
    model = convert_sync_batchnorm(model, process_group=bn_group)
    task = ClassificationTask(model=model, criterion=nn.CrossEntropyLoss(), device=device)
    optimizer = create_optimizer_v2(task.get_trainable_module(), opt='momentum', lr=0.02, weight_decay=1e-4,
                                    momentum=0.9)
    return task, optimizer


def loader_for(dataset, epoch: int):
    sampler = torch.utils.data.distributed.DistributedSampler(dataset, shuffle=True, seed=0, drop_last=False)
    sampler.set_epoch(epoch)
    return torch.utils.data.DataLoader(dataset, batch_size=BATCH, sampler=sampler, drop_last=False)


def train_epoch(task, optimizer, dataset, epoch: int):
    model = task.get_trainable_module()
    model.train()
    losses, sizes = [], []
    for x, y in loader_for(dataset, epoch):
        loss = task(x, y)['loss']
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        sizes.append(len(y))
    return losses, sizes


def gathered(tensor: torch.Tensor):
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--out', required=True)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--node-budget', type=float, default=None)
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    nn.SyncBatchNorm.forward = _cpu_sync_bn_forward
    DDP._passing_sync_batchnorm_handle = lambda self, module: None  # its only job: refuse CPU modules
    device = init_distributed_device(args)  # train.py's call: torchrun env -> gloo on cpu
    assert args.distributed and args.world_size == 2, (args.distributed, args.world_size)
    out = Path(args.out)
    dataset = make_data()

    task, optimizer = build(args, device)
    plain = task.get_trainable_module()
    n_bn = sum(isinstance(m, nn.BatchNorm2d) and not isinstance(m, nn.SyncBatchNorm) for m in plain.modules())
    n_sync_in_stages = sum(isinstance(m, nn.SyncBatchNorm) for s in timm_ddw.graph_stages(plain).values()
                           for m in s.modules())
    # train.py on CUDA passes device_ids=[device]; DDP only accepts None for CPU modules
    task.prepare_distributed(device_ids=None, broadcast_buffers=True)  # train.py: not args.no_ddp_bb
    ddp = task.get_trainable_module()
    saver = None
    if args.rank == 0:
        saver = CheckpointSaver(model=ddp, optimizer=optimizer, task=task, checkpoint_dir=str(out),
                                recovery_dir=str(out), max_history=1)

    history = []
    for epoch in range(EPOCHS):
        losses, sizes = train_epoch(task, optimizer, dataset, epoch)
        history.append(dict(losses=losses, sizes=sizes))
        if epoch == RESUME_EPOCH - 1 and saver is not None:
            saver.save_checkpoint(epoch)  # writes last.pth.tar
    dist.barrier()

    params = torch.cat([p.detach().flatten() for p in ddp.module.parameters()])
    buffers = torch.cat([b.detach().float().flatten() for b in ddp.module.buffers()])
    p_all, b_all = gathered(params), gathered(buffers)
    max_param_diff = max((p - p_all[0]).abs().max().item() for p in p_all)
    max_buffer_diff = max((b - b_all[0]).abs().max().item() for b in b_all)

    # resume: a fresh task and optimizer from the mid-run checkpoint, then the next step
    task2, optimizer2 = build(args, device)
    resume_epoch = resume_task_checkpoint(task2, str(out / 'last.pth.tar'), optimizer=optimizer2, log_info=False)
    task2.prepare_distributed(device_ids=None, broadcast_buffers=True)
    resumed_losses, _ = train_epoch(task2, optimizer2, dataset, resume_epoch)

    if args.rank == 0:
        result = dict(
            world_size=args.world_size, history=history, resume_epoch=resume_epoch,
            uninterrupted_next=history[RESUME_EPOCH]['losses'][0], resumed_next=resumed_losses[0],
            uninterrupted_epoch=history[RESUME_EPOCH]['losses'], resumed_epoch=resumed_losses,
            max_param_diff=max_param_diff, max_buffer_diff=max_buffer_diff, num_params=params.numel(),
            num_bn_left=n_bn, num_sync_bn_in_stages=n_sync_in_stages,
            ddp_find_unused=getattr(ddp, 'find_unused_parameters', None),
            ddp_broadcast_buffers=getattr(ddp, 'broadcast_buffers', None),
            budget_shifts=[s.budget_shift.tolist() for s in timm_ddw.graph_stages(ddp.module).values()
                           if s.budget_shift is not None],
        )
        (out / 'result.json').write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()


if __name__ == '__main__':
    os.environ.setdefault('OMP_NUM_THREADS', '1')
    main()
