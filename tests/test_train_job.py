"""``timm-ddw train``: the main job end to end on a small budget, its report, and its data errors."""
import argparse
import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

import timm_ddw
from timm_ddw import data
from timm_ddw import train as job

HAVE_FMNIST = (Path(data.FASHION_MNIST_DIR) / 'train-images-idx3-ubyte.gz').is_file()
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason='apt-get install -y dataset-fashion-mnist')


def parse(*argv):
    parser = argparse.ArgumentParser()
    job.register_cli(parser.add_subparsers())
    return parser.parse_args(['train', *argv])


def write_idx(path, array):
    header = struct.pack('>HBB', 0, 0x08, array.ndim) + struct.pack(f'>{array.ndim}I', *array.shape)
    with gzip.open(path, 'wb') as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_roundtrip_and_errors(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (5, 7, 3))
    write_idx(tmp_path / 'x.gz', a)
    np.testing.assert_array_equal(data.read_idx(tmp_path / 'x.gz'), a)
    (tmp_path / 'bad').write_bytes(b'\x00\x00\x0d\x01' + b'\x00' * 8)
    with pytest.raises(ValueError, match='not a uint8 IDX file'):
        data.read_idx(tmp_path / 'bad')


def test_missing_data_set_names_apt_and_data_flag(tmp_path, capsys):
    args = parse('--fashion-mnist-dir', str(tmp_path / 'nowhere'), '--output', str(tmp_path / 'out'))
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert 'apt-get install -y dataset-fashion-mnist' in err and '--data DIR' in err
    assert not (tmp_path / 'out').exists()


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('quick')
    args = parse('--quick', '--output', str(out), '--no-progress')
    assert args.func(args) == 0
    return out, json.loads((out / 'metrics.json').read_text()), json.loads((out / 'routing.json').read_text())


@needs_fmnist
def test_quick_run_writes_report(quick_run):
    out, metrics, routing = quick_run
    assert (out / 'model' / 'model.safetensors').is_file() and (out / 'model' / 'config.json').is_file()
    cfg = json.loads((out / 'model' / 'config.json').read_text())['pretrained_cfg']
    assert cfg['input_size'] == [1, 32, 32] and cfg['mean'] == [0.286] and cfg['std'] == [0.353]
    assert metrics['model'] == 'ddw_resnet18' and metrics['dataset'] == 'fashion-mnist'
    assert metrics['train_images'] == 256 and metrics['val_images'] == 256 and metrics['steps'] == 8
    assert len(metrics['history']) == metrics['epochs'] == 1
    h = metrics['history'][0]
    assert h['train_img_per_s'] > 0 and h['val_img_per_s'] > 0 and np.isfinite(h['train_loss'])
    assert [st['name'] for st in routing['stages']] == ['layer1', 'layer2', 'layer3', 'layer4']
    assert routing['num_samples'] == 256 and routing['class_names'][0] == 'T-shirt/top'
    assert {'routing.npz', 'summary.txt', 'routing_mean.png', 'routing_std.png'} <= {p.name for p in out.iterdir()}


@needs_fmnist
def test_reported_accuracy_and_routing_match_the_exported_weights(quick_run):
    """Recompute top-1 and the routing summary from model/ with independent preprocessing."""
    out, metrics, routing = quick_run
    model = timm.create_model('ddw_resnet18', num_classes=10, in_chans=1, **metrics['model_args'])
    model.load_state_dict(load_file(out / 'model' / 'model.safetensors'))
    model.eval()
    images, labels = data.load_fashion_mnist(data.FASHION_MNIST_DIR, 'val')
    index = np.random.default_rng(metrics['recipe']['seed'] + 1).permutation(len(images))[:256]
    x = torch.stack([torch.from_numpy(np.asarray(Image.fromarray(images[i]).resize((32, 32), Image.BILINEAR),
                                                 dtype=np.float32)) for i in index])[:, None] / 255
    x = (x - 0.2860) / 0.3530
    with torch.no_grad(), timm_ddw.capture_routing(model) as cap:
        pred = model(x).argmax(1)
    top1 = 100 * (pred == torch.from_numpy(labels[index].astype(np.int64))).float().mean().item()
    assert metrics['val_top1'] == pytest.approx(top1, abs=1e-4)
    for r in routing['stages']:
        m = cap[r['name']][0].double()
        n = m.shape[1]
        edges = torch.tril(torch.ones(n, n), -1).bool()  # complete graph: every i < j
        mean = torch.tensor([[float('nan') if v is None else v for v in row] for row in r['mean']],
                            dtype=torch.float64)
        torch.testing.assert_close(mean[edges], m.mean(0)[edges], atol=1e-6, rtol=0)
        assert r['num_edges'] == int(edges.sum())
        assert r['summary']['closed_share'] == pytest.approx((m[:, edges] == 0).double().mean().item(), abs=1e-6)


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp('folder')
    rng = np.random.default_rng(0)
    for split, n in (('train', 12), ('val', 4)):
        for name in ('cat', 'dog', 'owl'):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
                Image.fromarray(img).save(root / split / name / f'{i}.png')
    return root


def test_image_folder_run(image_folder, tmp_path):
    args = parse('--data', str(image_folder), '--quick', '--epochs', '2', '--batch-size', '8', '--model',
                 'ddw_regnetx_600m', '--output', str(tmp_path / 'run'), '--no-progress')
    metrics = job.train(args)
    assert metrics['classes'] == ['cat', 'dog', 'owl'] and metrics['num_classes'] == 3 and metrics['in_chans'] == 3
    assert metrics['train_images'] == 36 and metrics['val_images'] == 12
    assert [h['steps'] for h in metrics['history']] == [4, 8]  # --max-steps 8 spread over 2 epochs
    saved = json.loads((tmp_path / 'run' / 'metrics.json').read_text())
    assert saved['val_top1'] == metrics['val_top1']
    with pytest.raises(FileNotFoundError, match='--data'):
        job.train(parse('--data', str(tmp_path / 'none'), '--quick'))
