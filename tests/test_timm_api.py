"""timm's train.py path through timm's library API: data config, loaders, optimizer, scheduler, EMA, sync-bn."""
import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from PIL import Image
from timm.data import create_dataset, create_loader, resolve_data_config
from timm.layers import convert_sync_batchnorm
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.task import ClassificationTask
from timm.utils import ModelEmaV3, random_seed

import timm_ddw

ROUTING = ('router_weight', 'router_bias', 'tau')


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    """ImageNet layout: train/ and val/, one folder per class; class c is bright in a quadrant."""
    root = tmp_path_factory.mktemp('imagefolder')
    rng = np.random.default_rng(0)
    for split, n in (('train', 10), ('val', 3)):
        for c in range(2):
            (root / split / f'class{c}').mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 60, (40, 40, 3), dtype=np.uint8)
                img[c * 20:(c + 1) * 20, :20] = 230
                Image.fromarray(img).save(root / split / f'class{c}' / f'{i}.png')
    return root


def test_data_config_is_the_twins():
    for name, twin in (('ddw_resnet50', 'resnet50'), ('ddw_regnety_600m', 'regnety_006'),
                       ('ddw_efficientnet_b0', 'efficientnet_b0')):
        ddw_cfg = resolve_data_config({}, model=timm.create_model(name, device='meta'))
        twin_cfg = resolve_data_config({}, model=timm.create_model(twin, device='meta'))
        assert ddw_cfg == twin_cfg, name
    cfg = resolve_data_config({'img_size': 32}, model=timm.create_model('ddw_resnet18', device='meta'))
    assert cfg['input_size'] == (3, 32, 32)


def test_optimizer_groups_keep_routers_out_of_weight_decay():
    model = timm.create_model('ddw_resnet18', num_classes=5)
    opt = create_optimizer_v2(model, opt='momentum', lr=0.1, weight_decay=1e-4, momentum=0.9)
    wd = {id(p): g['weight_decay'] for g in opt.param_groups for p in g['params']}
    named = dict(model.named_parameters())
    assert len(wd) == len(named)  # every parameter is optimised, routers included
    for n, p in named.items():
        if n.rpartition('.')[2] in ROUTING or p.ndim <= 1:
            assert wd[id(p)] == 0.0, n
        else:
            assert wd[id(p)] == 1e-4, n


def test_layer_decay_puts_routers_with_their_stage():
    model = timm.create_model('ddw_resnet18', num_classes=5)
    opt = create_optimizer_v2(model, opt='sgd', lr=0.1, weight_decay=1e-4, layer_decay=0.5)
    scale = {id(p): g['lr_scale'] for g in opt.param_groups for p in g['params']}
    named = dict(model.named_parameters())
    for stage in ('layer1', 'layer2', 'layer3', 'layer4'):
        router = scale[id(named[f'{stage}.router_weight'])]
        assert router == scale[id(named[f'{stage}.tau'])] == scale[id(named[f'{stage}.1.conv1.weight'])]
        assert router > scale[id(named[f'{stage}.0.conv1.weight'])]
    assert scale[id(named['layer1.router_weight'])] < scale[id(named['layer2.0.conv1.weight'])]


def test_train_py_loop_on_an_image_folder(image_folder):
    """create_dataset/create_loader/ClassificationTask/optimizer/scheduler/ModelEmaV3 as train.py wires them."""
    random_seed(0)  # torch, numpy and python (timm's transforms use python's random)
    model = timm.create_model('ddw_resnet18', num_classes=2, in_chans=3)
    model.set_grad_checkpointing(enable=True)
    data_config = resolve_data_config({'img_size': 32}, model=model)
    ds_train = create_dataset('', root=str(image_folder), split='train', is_training=True)
    ds_val = create_dataset('', root=str(image_folder), split='validation', is_training=False)
    common = dict(input_size=data_config['input_size'], mean=data_config['mean'], std=data_config['std'],
                  device=torch.device('cpu'), use_prefetcher=False, num_workers=0)
    loader_train = create_loader(ds_train, batch_size=8, is_training=True, scale=(0.9, 1.0), hflip=0.0,
                                 interpolation='bilinear', **common)
    loader_val = create_loader(ds_val, batch_size=6, is_training=False, crop_pct=1.0,
                               interpolation='bilinear', **common)
    assert len(loader_train) == 2  # 20 images, drop_last as in train.py
    task = ClassificationTask(model=model, criterion=nn.CrossEntropyLoss(), device=torch.device('cpu'))
    optimizer = create_optimizer_v2(task.get_trainable_module(), opt='momentum', lr=0.05, weight_decay=1e-4,
                                    momentum=0.9)
    scheduler, num_epochs = create_scheduler_v2(optimizer, sched='cosine', num_epochs=4, warmup_epochs=1,
                                                warmup_lr=0.01, updates_per_epoch=len(loader_train))
    assert num_epochs == 4
    ema = ModelEmaV3(model, decay=0.5)

    epoch_losses = []
    step = 0
    for epoch in range(num_epochs):
        model.train()
        losses = []
        for x, y in loader_train:
            assert x.shape[1:] == (3, 32, 32)
            loss = task(x, y)['loss']
            losses.append(loss.item())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            ema_prev = ema.module.state_dict()['layer3.router_weight'].clone()
            ema.update(model, step=step)  # train.py: task.update_ema(step=num_updates)
            ema_now, live = ema.module.state_dict()['layer3.router_weight'], model.state_dict()['layer3.router_weight']
            # V3 EMA averages the routers too: a copy at step 1, then ema = 0.5 * ema + 0.5 * model
            expected = live if step == 1 else 0.5 * ema_prev + 0.5 * live
            torch.testing.assert_close(ema_now, expected)
            scheduler.step_update(num_updates=step)
        scheduler.step(epoch + 1)
        epoch_losses.append(sum(losses) / len(losses))
    assert epoch_losses[-1] < 0.5 * epoch_losses[0], epoch_losses
    assert timm_ddw.graph_stages(ema.module)  # the EMA copy is a DDW model, routing can be read from it
    x_val, y_val = next(iter(loader_val))
    with timm_ddw.capture_routing(ema.module) as routing:
        ema.module.eval()(x_val)
    assert routing['layer4'][0].shape == (6, 3, 3)


def test_sync_batchnorm_conversion_keeps_state_dict():
    model = timm.create_model('ddw_mobilenetv2_100', num_classes=5)
    keys = {k: v.shape for k, v in model.state_dict().items()}
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    model = convert_sync_batchnorm(model)
    assert {k: v.shape for k, v in model.state_dict().items()} == keys
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules()) == n_bn > 0
    stages = timm_ddw.graph_stages(model)
    assert stages and all(any(isinstance(m, nn.SyncBatchNorm) for m in s.modules()) for s in stages.values())
