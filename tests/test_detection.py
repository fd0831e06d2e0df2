"""timm_ddw.detection: DDW backbones in torchvision's Faster R-CNN + FPN, Fashion-MNIST detection, the benchmark."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image
from test_pretrained import randomise_  # random BN statistics: timm zero-inits each block's last BN
from timm.layers import freeze_batch_norm_2d
from timm.layers.norm_act import FrozenBatchNormAct2d
from torchvision.models.detection import FasterRCNN
from torchvision.ops.misc import FrozenBatchNorm2d

import timm_ddw
from timm_ddw.data import FASHION_MNIST_DIR
from timm_ddw.detection import (
    FashionMnistDetection,
    backbone_inputs,
    collect_detector_routing,
    create_detector,
    create_fpn_backbone,
    detection_collate,
    evaluate_coco,
)

ROOT = Path(__file__).resolve().parents[1]
ROUTING = ('router_weight', 'router_bias', 'tau')
FROZEN_BN = (FrozenBatchNorm2d, FrozenBatchNormAct2d)  # what timm's freeze_batch_norm_2d makes
needs_data = pytest.mark.skipif(not (FASHION_MNIST_DIR / 'train-images-idx3-ubyte.gz').exists(),
                                reason='Fashion-MNIST not installed (dataset-fashion-mnist)')
# small and fast: 64 px inputs, a thin FPN, few proposals
SMALL = dict(fpn_channels=16, min_size=64, max_size=64, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50,
             rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50, box_batch_size_per_image=32)
# the modules each family's first two stages (stem and stride 4) are made of
FIRST_TWO_STAGES = {
    'ddw_resnet18': ('conv1.', 'bn1.', 'layer1.'),
    'ddw_regnetx_600m': ('stem.', 's1.'),
    'ddw_mobilenetv2_100': ('conv_stem.', 'bn1.', 'blocks.0.', 'blocks.1.'),
}


def _batch():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=g) for _ in range(2)]
    targets = [dict(boxes=torch.tensor([[4., 6., 30., 40.], [34., 10., 60., 28.]]), labels=torch.tensor([1, 2])),
               dict(boxes=torch.tensor([[10., 12., 50., 60.]]), labels=torch.tensor([3]))]
    return images, targets


@pytest.mark.parametrize('name', list(FIRST_TWO_STAGES))
def test_train_step_reaches_routers_and_eval_detects(name):
    det = create_detector(name, 4, **SMALL)
    assert isinstance(det, FasterRCNN)
    assert det.backbone.body.feature_info.reduction() == [4, 8, 16, 32]
    images, targets = _batch()
    det.train()
    losses = det(images, targets)
    assert set(losses) == {'loss_classifier', 'loss_box_reg', 'loss_objectness', 'loss_rpn_box_reg'}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    routing = {n: p for n, p in det.named_parameters() if n.rpartition('.')[2] in ROUTING}
    stages = timm_ddw.graph_stages(det.backbone.body)
    assert len(routing) == 3 * len(stages) > 0
    no_grad = [n for n, p in routing.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f'no gradient reached {no_grad}'

    det.eval()
    with torch.no_grad():
        out = det(images)
    assert len(out) == 2
    for o in out:
        assert set(o) == {'boxes', 'labels', 'scores'}
        assert o['boxes'].shape[1:] == (4,) and len(o['boxes']) == len(o['labels']) == len(o['scores']) > 0
        assert o['boxes'].min() >= 0 and o['boxes'].max() <= 64
        assert o['labels'].min() >= 1 and o['labels'].max() <= 3


@pytest.mark.parametrize('name', list(FIRST_TWO_STAGES))
def test_frozen_stages_and_batch_norm(name):
    det = create_detector(name, 4, trainable_stages=3, freeze_bn=True, **SMALL)
    body = det.backbone.body
    live_bn = [n for n, m in body.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert not live_bn
    assert any(isinstance(m, FROZEN_BN) for m in body.modules())
    frozen = FIRST_TWO_STAGES[name]
    wrong = [n for n, p in body.named_parameters() if p.requires_grad == n.startswith(frozen)]
    assert not wrong, f'trainable_stages=3 got requires_grad wrong for {wrong}'
    # routers and thresholds of the trainable stages stay trainable under frozen BN
    trainable_routing = [n for n, p in body.named_parameters() if p.requires_grad and n.rpartition('.')[2] in ROUTING]
    assert len(trainable_routing) >= 9

    # live BN (a random backbone's default) still freezes the BN of the frozen stages only
    det = create_detector(name, 4, trainable_stages=3, **SMALL)
    for n, m in det.backbone.body.named_modules():
        if isinstance(m, (torch.nn.modules.batchnorm._BatchNorm,) + FROZEN_BN):
            assert isinstance(m, FROZEN_BN) == f'{n}.'.startswith(frozen), n


def test_frozen_bn_stays_put_in_training():
    det = create_detector('ddw_resnet18', 4, trainable_stages=3, freeze_bn=True, **SMALL)
    body = det.backbone.body
    before = {k: v.clone() for k, v in body.state_dict().items()}
    opt = torch.optim.SGD([p for p in det.parameters() if p.requires_grad], lr=0.1)
    det.train()
    sum(det(*_batch()).values()).backward()
    opt.step()
    after = body.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not any(k.endswith(('running_mean', 'running_var')) for k in changed)
    assert not any(k.startswith(('conv1.', 'layer1.')) for k in changed)
    # (with frozen BN, timm's zero-initialised last BN of each block keeps its residual branch at 0:
    # the shortcut convs learn, conv1 of a block does not)
    assert {'layer2.router_bias', 'layer4.tau', 'layer3.0.downsample.0.weight'} <= changed


def test_trainable_stages_defaults_follow_torchvision():
    body = create_detector('ddw_resnet18', 4, **SMALL).backbone.body
    assert all(p.requires_grad for p in body.parameters())  # random backbone: everything trains, BN live
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())
    body = create_detector('ddw_resnet18', 4, trainable_stages=0, **SMALL).backbone.body
    assert not any(p.requires_grad for p in body.parameters())


def test_chain_wiring_gives_the_twins_features():
    torch.manual_seed(0)
    twin = create_detector('resnet18', 4, **SMALL)
    randomise_(twin.backbone.body)
    chain = create_detector('ddw_resnet18', 4, wiring='chain', **SMALL)
    chain.load_state_dict(twin.state_dict())  # strict: the chain wiring adds no parameters
    assert not timm_ddw.graph_stages(twin)
    x = torch.randn(2, 3, 64, 64)
    twin.eval()
    chain.eval()
    with torch.no_grad():
        a, b = twin.backbone(x), chain.backbone(x)
        assert list(a) == list(b) == ['0', '1', '2', '3', 'pool']
        assert all(torch.equal(a[k], b[k]) for k in a)
        images = list(x.sigmoid())
        for oa, ob in zip(twin(images), chain(images)):
            assert all(torch.equal(oa[k], ob[k]) for k in oa)
        # not vacuous: the dynamic wiring with the same block weights computes other features
        dynamic = create_detector('ddw_resnet18', 4, **SMALL)
        dynamic.load_state_dict(twin.state_dict(), strict=False)
        c = dynamic.eval().backbone(x)
        assert not torch.allclose(a['3'], c['3'])


def test_pretrained_backbone_loads_the_chaininit_tag(tmp_path):
    import safetensors.torch
    twin = randomise_(timm.create_model('resnet18'))
    path = tmp_path / 'resnet18.safetensors'
    safetensors.torch.save_file(twin.state_dict(), path)
    overlay = dict(pretrained_cfg_overlay=dict(file=str(path)))
    det = create_detector('ddw_resnet18', 4, pretrained_backbone=True, backbone_kwargs=overlay, **SMALL)
    body = det.backbone.body
    assert body.pretrained_cfg['tag'].endswith('_chaininit')
    ref = timm.create_model('resnet18', features_only=True, out_indices=(1, 2, 3, 4), pretrained=True, **overlay)
    ref = freeze_batch_norm_2d(ref)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(body.eval()(x), ref.eval()(x)))
    # a pretrained backbone defaults to torchvision's fine-tuning setting: 3 trainable stages, frozen BN
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in body.modules())
    assert [n for n, p in body.named_parameters() if not p.requires_grad] == \
        [n for n, _ in body.named_parameters() if n.startswith(('conv1.', 'layer1.'))]
    assert det.transform.image_mean == list(body.pretrained_cfg['mean'])


def test_bad_input_fails_with_one_line():
    with pytest.raises(ValueError, match="unknown model 'ddw_resnet19'"):
        create_detector('ddw_resnet19', 4)
    with pytest.raises(ValueError, match=r"\['wiring'\] apply to ddw_\* models only"):
        create_detector('resnet18', 4, wiring='chain')
    # a pretrained tag in the name keeps it a DDW model
    backbone = create_fpn_backbone('ddw_resnet18.a1_in1k_chaininit', wiring='static', fpn_channels=8)
    assert backbone.body.layer1.wiring == 'static'
    with pytest.raises(ValueError, match='no feature maps at strides'):
        create_detector('vit_tiny_patch16_224', 4)
    with pytest.raises(ValueError, match='trainable_stages=6'):
        create_detector('ddw_resnet18', 4, trainable_stages=6)
    with pytest.raises(ValueError, match='counts the background'):
        create_detector('ddw_resnet18', 1)
    with pytest.raises(ValueError, match="wiring='nope' is not one of"):
        create_detector('ddw_resnet18', 4, wiring='nope')


def test_torchvision_reference_scripts_find_the_builders():
    det = torchvision.models.get_model('fasterrcnn_ddw_resnet18_fpn', weights=None, weights_backbone=None,
                                       num_classes=5, trainable_backbone_layers=None, rpn_score_thresh=0.05)
    assert isinstance(det, FasterRCNN) and timm_ddw.graph_stages(det)
    assert det.roi_heads.box_predictor.cls_score.out_features == 5
    assert (det.transform.min_size, det.transform.max_size) == ((800,), 1333)  # the paper's COCO input size
    static = torchvision.models.get_model('fasterrcnn_timm_resnet18_fpn')
    assert not timm_ddw.graph_stages(static) and static.roi_heads.box_predictor.cls_score.out_features == 91
    with pytest.raises(ValueError, match='no trained detector weights'):
        torchvision.models.get_model('fasterrcnn_ddw_resnet18_fpn', weights='COCO_V1')


# ---------------------------------------------------------------------------------------- data set

@needs_data
def test_synthetic_boxes_enclose_exactly_the_pasted_items():
    ds = FashionMnistDetection(30, seed=3)
    counts = []
    for i in range(len(ds)):
        canvas, boxes, labels, placed = ds.compose(i)
        counts.append(len(boxes))
        assert 1 <= len(boxes) <= 4 and len(boxes) == len(labels) == len(placed)
        inside = np.zeros_like(canvas, dtype=bool)
        for (x1, y1, x2, y2), label, p in zip(boxes, labels, placed):
            assert 28 <= p['side'] <= 64
            assert label == ds.item_labels[p['index']] + 1
            # the item, rescaled and pasted at (x, y): its non-zero pixels fill its box to every edge
            item = np.asarray(Image.fromarray(ds.items[p['index']]).resize((p['side'],) * 2, Image.BILINEAR))
            pasted = np.zeros_like(canvas)
            pasted[p['y']:p['y'] + p['side'], p['x']:p['x'] + p['side']] = item
            rows, cols = np.flatnonzero(pasted.any(1)), np.flatnonzero(pasted.any(0))
            assert (x1, y1, x2, y2) == (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
            assert np.array_equal(canvas[y1:y2, x1:x2], pasted[y1:y2, x1:x2])
            assert not inside[y1:y2, x1:x2].any()  # boxes are disjoint
            inside[y1:y2, x1:x2] = True
        assert not canvas[~inside].any()  # nothing outside the boxes
    assert set(counts) == {1, 2, 3, 4}

    image, target = ds[0]
    canvas, boxes, labels, _ = ds.compose(0)
    assert image.shape == (1, 128, 128) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    assert torch.equal(image[0], torch.from_numpy(canvas).float() / 255)
    assert torch.equal(target['boxes'], torch.from_numpy(boxes).float())
    assert torch.equal(target['labels'], torch.from_numpy(labels))


@needs_data
def test_synthetic_data_is_deterministic_per_seed_and_index():
    a, b = FashionMnistDetection(10, seed=5), FashionMnistDetection(40, seed=5)
    for i in (0, 7):
        assert np.array_equal(a.compose(i)[0], b.compose(i)[0])
    assert not np.array_equal(a.compose(0)[0], FashionMnistDetection(10, seed=6).compose(0)[0])
    test = FashionMnistDetection(10, split='test', seed=5)
    assert len(test.items) == 10000 and not np.array_equal(a.compose(0)[0], test.compose(0)[0])


class _Oracle(torch.nn.Module):
    """Returns each image's ground truth, shifted by ``shift`` px, as detections."""

    def __init__(self, dataset, shift: float = 0.0):
        super().__init__()
        self.targets = [t for _, t in dataset]
        self.shift = shift
        self.seen = 0

    def forward(self, images):
        out = []
        for _ in images:
            t = self.targets[self.seen]
            self.seen += 1
            out.append(dict(boxes=t['boxes'] + self.shift, labels=t['labels'], scores=torch.ones(len(t['labels']))))
        return out


def test_coco_ap_of_exact_and_shifted_boxes():
    g = torch.Generator().manual_seed(0)
    dataset = []
    for i in range(6):
        xy = torch.randint(0, 60, (2, 2), generator=g).float()
        boxes = torch.cat([xy, xy + torch.tensor([[30., 40.]])], 1)
        dataset.append((torch.zeros(1, 128, 128), dict(boxes=boxes, labels=torch.tensor([1 + i % 3, 2]),
                                                         image_id=torch.tensor(i))))
    exact = evaluate_coco(_Oracle(dataset), dataset, batch_size=4)
    assert exact['AP'] == pytest.approx(100.0) and exact['AP50'] == exact['AP75'] == pytest.approx(100.0)
    assert exact['APl'] is None and exact['detections'] == 12  # no object above 96^2 px
    # 30x40 boxes moved 8 px right and down: IoU 704/1696 = 0.42, below every COCO threshold
    assert evaluate_coco(_Oracle(dataset, 8.0), dataset)['AP50'] == pytest.approx(0.0)
    # by 2 px: IoU 1064/1336 = 0.80, a hit at the thresholds 0.5..0.75 (6 of 10), a miss at 0.8..0.95
    shifted = evaluate_coco(_Oracle(dataset, 2.0), dataset)
    assert shifted['AP50'] == shifted['AP75'] == pytest.approx(100.0) and shifted['AP'] == pytest.approx(60.0)


@needs_data
def test_routing_analysis_over_detection_images():
    det = create_detector('ddw_resnet18', 11, **SMALL, backbone_kwargs=dict(in_chans=1))
    ds = FashionMnistDetection(4, canvas_size=64, item_sizes=(16, 28))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=detection_collate)
    det.eval()
    x, labels = next(backbone_inputs(det, loader))
    assert x.shape == (2, 1, 64, 64) and labels.dtype == torch.int64 and labels.min() >= 1
    stats = collect_detector_routing(det, loader, progress=False)
    assert stats.num_samples == 4 and stats.stage_names == ['layer1', 'layer2', 'layer3', 'layer4']
    assert stats.has_classes
    with timm_ddw.capture_routing(det) as routing, torch.no_grad():
        det([ds[0][0], ds[1][0]])
    assert routing['backbone.body.layer3'][0].shape == (2, 3, 3)


@needs_data
def test_benchmark_tiny_run_writes_json(tmp_path):
    spec = importlib.util.spec_from_file_location('bench_detection', ROOT / 'benchmarks' / 'detection.py')
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / 'det'
    argv = ['--seeds', '0', '--train-images', '8', '--test-images', '4', '--batch-size', '4', '--max-steps', '2',
            '--warmup-steps', '1', '--log-every', '1', '--jobs', '1', '--canvas', '64', '--out-dir', str(out)]
    assert bench.main(argv) == 0
    for variant in ('chain', 'dynamic'):
        rec = json.loads((out / f'{variant}_seed0.json').read_text())
        assert rec['variant'] == variant and rec['budget']['steps'] == 2 and len(rec['curve']) == 2
        assert set(rec['coco']) == {'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl'}
        assert (rec['routing'] is None) == (variant == 'chain')
    md = (tmp_path / 'det.md').read_text()
    assert '| chain | 1 |' in md and '| dynamic | 1 |' in md and 'resnet50 (COCO, paper) | 36.42 | 38.12 | +1.70' in md
    stamp = (out / 'chain_seed0.json').stat().st_mtime_ns
    assert bench.main(argv) == 0  # finished runs are skipped
    assert (out / 'chain_seed0.json').stat().st_mtime_ns == stamp
