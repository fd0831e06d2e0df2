"""The main job through the library (TrainConfig -> train): report, resume, data checks, output folders."""
import contextlib
import gzip
import io
import json
import logging
import struct
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from cli_util import make_image_folder, md5s
from PIL import Image
from safetensors.torch import load_file

import timm_ddw
from timm_ddw import data
from timm_ddw import train as job
from timm_ddw.data import DataError
from timm_ddw.loading import read_train_checkpoint
from timm_ddw.train import TrainConfig, TrainingInterrupted, train

HAVE_FMNIST = (Path(data.FASHION_MNIST_DIR) / 'train-images-idx3-ubyte.gz').is_file()
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason='apt-get install -y dataset-fashion-mnist')


def write_idx(path, array):
    header = struct.pack('>HBB', 0, 0x08, array.ndim) + struct.pack(f'>{array.ndim}I', *array.shape)
    with gzip.open(path, 'wb') as f:
        f.write(header + array.astype(np.uint8).tobytes())


def tiny(root: Path, **kwargs) -> TrainConfig:
    """A run of seconds on a 16 px folder of 2 x 8 training images."""
    folder = root / 'images'
    if not folder.exists():
        make_image_folder(folder, {'train': 8, 'val': 3})
    base = dict(data_dir=str(folder), img_size=16, batch_size=4, epochs=2, warmup_steps=1, lr=0.05,
                output=str(root / 'run'))
    return TrainConfig(**{**base, **kwargs})


def test_read_idx_roundtrip_and_errors(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (5, 7, 3))
    write_idx(tmp_path / 'x.gz', a)
    np.testing.assert_array_equal(data.read_idx(tmp_path / 'x.gz'), a)
    (tmp_path / 'bad').write_bytes(b'\x00\x00\x0d\x01' + b'\x00' * 8)
    with pytest.raises(ValueError, match='not a uint8 IDX file'):
        data.read_idx(tmp_path / 'bad')


def test_missing_data_set_names_apt_and_data_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match='apt-get install -y dataset-fashion-mnist') as e:
        train(TrainConfig(fashion_mnist_dir=str(tmp_path / 'nowhere'), output=str(tmp_path / 'out')), progress=False)
    assert '--data-dir DIR' in str(e.value)
    assert not (tmp_path / 'out').exists()


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('quick') / 'run'
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger('timm').addHandler(handler)
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            train(TrainConfig.quick(output=str(out)), progress=False)
    finally:
        logging.getLogger('timm').removeHandler(handler)
    return (out, json.loads((out / 'metrics.json').read_text()), json.loads((out / 'routing.json').read_text()),
            stdout.getvalue(), [r.getMessage() for r in records])


@needs_fmnist
def test_quick_run_writes_report(quick_run):
    out, metrics, routing, _, _ = quick_run
    assert (out / 'model' / 'model.safetensors').is_file() and (out / 'model' / 'config.json').is_file()
    config = json.loads((out / 'model' / 'config.json').read_text())
    assert config['label_names'] == list(data.FASHION_MNIST_CLASSES) and config['model_args']['in_chans'] == 1
    cfg = config['pretrained_cfg']
    assert cfg['input_size'] == [1, 32, 32] and cfg['mean'] == [0.286] and cfg['std'] == [0.353]
    assert 'test_input_size' not in cfg  # not the twin's 288 px
    assert metrics['model'] == 'ddw_resnet18' and metrics['dataset'] == 'fashion-mnist'
    assert metrics['train_images'] == 256 and metrics['val_images'] == 256 and metrics['steps'] == 8
    assert len(metrics['history']) == metrics['epochs'] == 1
    h = metrics['history'][0]
    assert h['train_img_per_s'] > 0 and h['val_img_per_s'] > 0 and np.isfinite(h['train_loss'])
    assert [st['name'] for st in routing['stages']] == ['layer1', 'layer2', 'layer3', 'layer4']
    assert routing['num_samples'] == 256 and routing['class_names'][0] == 'T-shirt/top'
    assert {'routing.npz', 'summary.txt', 'routing_mean.png', 'routing_std.png', 'last.pth.tar'} <= {
        p.name for p in out.iterdir()}


@needs_fmnist
def test_quick_run_says_it_is_a_smoke_test_and_warns_nothing(quick_run):
    _, metrics, _, stdout, log = quick_run
    assert metrics['smoke_test'] is True
    assert 'quick run: a smoke test of the pipeline (8 steps on 256 images), not of the model' in stdout
    assert stdout.rstrip().splitlines()[-2] == '(quick run: a smoke test of the pipeline, not of the model)'
    assert not [m for m in log if 'does not match' in m], log  # timm's "Pretrained mean does not match 1 channels"


@needs_fmnist
def test_default_uses_torch_threads_and_prints_the_expected_time(tmp_path, monkeypatch):
    """The default leaves torch's thread count (one per core) alone; ``--threads N`` sets it and the
    caller's count comes back afterwards. Once 20 steps are timed, the run says how long it will take."""
    assert TrainConfig().threads == 0
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            metrics = train(TrainConfig.quick(output=str(tmp_path / 'a'), max_steps=24, train_subset=24 * 32),
                            progress=False)
        assert metrics['threads'] == 2 and torch.get_num_threads() == 2
        line = [x for x in stdout.getvalue().splitlines() if x.startswith('expected: about ')]
        assert len(line) == 1 and 'of training for the 4 steps left' in line[0], stdout.getvalue()
        metrics = train(TrainConfig.quick(output=str(tmp_path / 'b'), threads=1), progress=False)
        assert metrics['threads'] == 1 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@needs_fmnist
def test_reported_accuracy_and_routing_match_the_exported_weights(quick_run):
    """Recompute top-1 and the routing summary from model/ with independent preprocessing."""
    out, metrics, routing, _, _ = quick_run
    model = timm.create_model('ddw_resnet18', **metrics['model_args'])
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


def test_image_folder_run(tmp_path):
    make_image_folder(tmp_path / 'folder', {'train': 12, 'val': 4}, classes=('cat', 'dog', 'owl'), size=24)
    config = TrainConfig.quick(data_dir=str(tmp_path / 'folder'), epochs=2, batch_size=8, model='ddw_regnetx_600m',
                               output=str(tmp_path / 'run'))
    metrics = train(config, progress=False)
    assert metrics['classes'] == ['cat', 'dog', 'owl'] and metrics['num_classes'] == 3 and metrics['in_chans'] == 3
    assert metrics['train_images'] == 36 and metrics['val_images'] == 12
    assert [h['steps'] for h in metrics['history']] == [4, 8]  # --max-steps 8 spread over 2 epochs
    saved = json.loads((tmp_path / 'run' / 'metrics.json').read_text())
    assert saved['val_top1'] == metrics['val_top1']
    # model/ names the classes for timm and transformers; the checkpoint keeps them for `timm-ddw export`
    assert json.loads((tmp_path / 'run' / 'model' / 'config.json').read_text())['label_names'] == ['cat', 'dog', 'owl']
    assert read_train_checkpoint(tmp_path / 'run' / 'last.pth.tar')['label_names'] == ['cat', 'dog', 'owl']
    out = timm_ddw.hub.export_checkpoint(tmp_path / 'run' / 'last.pth.tar', tmp_path / 'export')
    assert json.loads((out / 'config.json').read_text())['label_names'] == ['cat', 'dog', 'owl']


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path):
    """2 epochs straight vs 1 epoch, stop, resume for the second: identical weights and metrics, bit for bit."""
    straight = train(tiny(tmp_path, output=str(tmp_path / 'straight'), model_ema=True, model_ema_warmup=True),
                     progress=False)
    steps = []

    def stop_in_second_epoch():
        steps.append(1)
        return len(steps) > 7  # epoch 1: 4 steps, 1 val and 1 EMA val batch; then 1 step of epoch 2

    with pytest.raises(TrainingInterrupted) as e:
        train(tiny(tmp_path, output=str(tmp_path / 'split'), model_ema=True, model_ema_warmup=True),
              should_stop=stop_in_second_epoch, progress=False)
    assert (e.value.epoch, e.value.saved_epochs) == (2, 1)
    assert e.value.checkpoint == tmp_path / 'split' / 'last.pth.tar'
    ckpt = torch.load(e.value.checkpoint, weights_only=False)
    assert {'state_dict', 'state_dict_ema', 'optimizer', 'scheduler', 'epoch', 'args', 'history'} <= set(ckpt)
    assert ckpt['epoch'] == 0 and ckpt['arch'] == 'ddw_resnet18' and ckpt['args'].model_ema is True
    assert not (tmp_path / 'split' / 'metrics.json').exists()

    resumed = train(TrainConfig.from_checkpoint(str(e.value.checkpoint)), progress=False)
    for key in ('val_top1', 'val_top5', 'val_loss', 'steps'):
        assert resumed[key] == straight[key], key
    for a, b in zip(straight['history'], resumed['history'], strict=True):
        assert (a['train_loss'], a['val_loss'], a['val_top1_ema']) == (b['train_loss'], b['val_loss'],
                                                                         b['val_top1_ema'])
    w1 = load_file(tmp_path / 'straight' / 'model' / 'model.safetensors')
    w2 = load_file(tmp_path / 'split' / 'model' / 'model.safetensors')  # continued in the checkpoint's folder
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    last1 = torch.load(tmp_path / 'straight' / 'last.pth.tar', weights_only=False)['state_dict']
    last2 = torch.load(tmp_path / 'split' / 'last.pth.tar', weights_only=False)['state_dict']
    assert all(torch.equal(last1[k], last2[k]) for k in last1)  # the raw weights too, not only the EMA


def test_timm_flags_num_classes_sched_channels_last_and_initial_checkpoint(tmp_path):
    first = train(tiny(tmp_path, epochs=1, num_classes=3, sched='tanh', channels_last=True, output=str(tmp_path / 'a')),
                  progress=False)
    assert first['num_classes'] == 3 and first['recipe']['sched'] == 'tanh'
    weights = tmp_path / 'a' / 'model' / 'model.safetensors'
    start = load_file(weights)
    assert start['fc.weight'].shape == (3, 512)
    train(tiny(tmp_path, epochs=1, num_classes=3, initial_checkpoint=str(weights), lr=1e-9, momentum=0.0,
               output=str(tmp_path / 'b')), progress=False)
    after = load_file(tmp_path / 'b' / 'model' / 'model.safetensors')
    for key in ('conv1.weight', 'layer3.router_weight', 'fc.weight'):  # started from the given weights
        torch.testing.assert_close(after[key], start[key], atol=1e-6, rtol=0)
    # the run's last.pth.tar exports as it is: architecture and arguments come from the checkpoint
    out = timm_ddw.hub.export_checkpoint(tmp_path / 'b' / 'last.pth.tar', tmp_path / 'export')
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'ddw_resnet18' and config['num_classes'] == 3
    assert 'label_names' not in config  # 2 class folders do not name 3 outputs


def test_resume_refuses_foreign_and_random_files(tmp_path):
    (tmp_path / 'random.pth.tar').write_bytes(np.random.default_rng(0).bytes(3000))
    with pytest.raises(timm_ddw.hub.DdwCheckpointError, match='is not a PyTorch checkpoint') as e:
        TrainConfig.from_checkpoint(str(tmp_path / 'random.pth.tar'))
    assert 'weights_only' not in str(e.value)
    torch.save({'state_dict': {}, 'epoch': 1}, tmp_path / 'foreign.pth.tar')
    with pytest.raises(timm_ddw.hub.DdwCheckpointError, match='not written by timm-ddw train'):
        TrainConfig.from_checkpoint(str(tmp_path / 'foreign.pth.tar'))


def test_output_folder_with_files_is_kept_and_weights_come_before_the_report(tmp_path, monkeypatch):
    (tmp_path / 'run').mkdir()
    (tmp_path / 'run' / 'metrics.json').write_text('{"earlier": "run"}')
    before = md5s(tmp_path / 'run')

    def broken_save(self, *a, **k):
        raise OSError('disk full while writing the routing report')

    monkeypatch.setattr(timm_ddw.routing.RoutingStats, 'save', broken_save)
    with pytest.raises(OSError, match='disk full'):
        train(tiny(tmp_path, epochs=1), progress=False)
    assert md5s(tmp_path / 'run') == before  # the earlier run is untouched
    new = tmp_path / 'run-1'
    assert (new / 'model' / 'model.safetensors').is_file() and (new / 'last.pth.tar').is_file()


def test_unwritable_output_is_refused_before_training(tmp_path):
    (tmp_path / 'file').write_text('x')
    with pytest.raises(NotADirectoryError, match='is a file, not a folder'):
        train(tiny(tmp_path, output=str(tmp_path / 'file')), progress=False)
    started = []
    with pytest.raises(PermissionError, match='cannot create the output folder'):
        train(tiny(tmp_path, output=str(tmp_path / 'file' / 'sub')), should_stop=lambda: started.append(1) or False,
              progress=False)
    assert not started  # refused before the first step


def test_image_folder_checks(tmp_path):
    make_image_folder(tmp_path / 'noval', {'train': 2})
    with pytest.raises(DataError, match=r'has no val/ \(or validation/\) folder'):
        data.image_folder_splits(tmp_path / 'noval')
    make_image_folder(tmp_path / 'loose', {'train': 0, 'val': 0}, classes=(), loose=2)
    with pytest.raises(DataError, match='holds images outside class sub-folders'):
        data.image_folder_splits(tmp_path / 'loose')
    make_image_folder(tmp_path / 'one', {'train': 2, 'validation': 1}, classes=('cat',))
    with pytest.raises(DataError, match='has 1 class sub-folder .cat.; training needs at least 2 classes'):
        data.image_folder_splits(tmp_path / 'one')
    make_image_folder(tmp_path / 'extra', {'train': 2}, classes=('cat', 'dog'))
    make_image_folder(tmp_path / 'extra', {'val': 1}, classes=('cat', 'cow'))
    with pytest.raises(DataError, match='classes the training split lacks: cow'):
        data.image_folder_splits(tmp_path / 'extra')
    make_image_folder(tmp_path / 'ok', {'train': 2, 'validation': 1}, classes=('b', 'a'))
    train_ds, val_ds, classes = data.image_folder_splits(tmp_path / 'ok')
    assert classes == ['a', 'b'] and len(train_ds) == 4 and len(val_ds) == 2


def test_config_checks(tmp_path):
    with pytest.raises(ValueError, match="'nope_model' is not a timm model"):
        train(TrainConfig(model='nope_model'))
    with pytest.raises(ValueError, match="'resnet18' is not a DDW model"):
        train(TrainConfig(model='resnet18'))
    with pytest.raises(ValueError, match="device 'gpu' is not a torch device"):
        train(TrainConfig(device='gpu'))
    with pytest.raises(ValueError, match="torchcompile='inductr' is not a torch.compile backend"):
        train(TrainConfig(torchcompile='inductr'))


@needs_fmnist
def test_torchcompile_trains_the_compiled_forward(tmp_path):
    """--torchcompile as timm's train.py: the training forward goes through torch.compile (here the
    aot_eager backend, seconds instead of inductor's minutes) and the run matches the eager one."""
    runs = {}
    for backend in (None, 'aot_eager'):
        torch._dynamo.reset()
        runs[backend] = train(TrainConfig.quick(output=str(tmp_path / str(backend)), torchcompile=backend,
                                                max_steps=4), progress=False)
    assert torch._dynamo.utils.counters['stats']['unique_graphs'] > 0
    assert runs['aot_eager']['history'][0]['train_loss'] == pytest.approx(runs[None]['history'][0]['train_loss'],
                                                                          rel=1e-4)
    with pytest.raises(ValueError, match='num_classes=1: the data has 2 classes'):
        train(tiny(tmp_path, num_classes=1), progress=False)
    with pytest.raises(ValueError, match="wiring='foo' is not one of"):
        train(tiny(tmp_path, model_kwargs=dict(wiring='foo')), progress=False)
    assert job.SCHEDULERS[0] == 'cosine'
