"""``timm-ddw`` as a user runs it, in child processes: one ``error:`` line for bad input, no lost work.

Most command lines run in one child process (``run_cli_batch``: one torch import for all of
them); Ctrl-C and the Hub without network get processes of their own.
"""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import timm
import torch
from cli_util import TIMM_DDW, cli_env, make_image_folder, md5s, one_error_line, run_cli_batch
from safetensors.torch import save_file

import timm_ddw  # noqa: F401

TINY = ['--img-size', '16', '-b', '4', '--epochs', '1', '--warmup-steps', '1', '--no-progress']


def unwritable(tmp: Path) -> Path:
    """A folder this user cannot create or write into (root ignores permissions: use /proc)."""
    if hasattr(os, 'geteuid') and os.geteuid() != 0:
        (tmp / 'ro').mkdir()
        (tmp / 'ro').chmod(0o555)
        return tmp / 'ro' / 'run'
    return Path('/proc/timm-ddw-cannot-write-here/run')


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('cli')
    f = dict(tmp=tmp)
    f['images'] = make_image_folder(tmp / 'images', {'train': 8, 'val': 3})
    f['noval'] = make_image_folder(tmp / 'noval', {'train': 2})
    f['loose'] = make_image_folder(tmp / 'loose', {'train': 0, 'val': 0}, classes=(), loose=2)
    f['one'] = make_image_folder(tmp / 'one', {'train': 2, 'val': 1}, classes=('cat',))
    (tmp / 'afile').write_text('not a folder')
    (tmp / 'random.pth.tar').write_bytes(os.urandom(4000))

    torch.manual_seed(0)
    two = timm.create_model('ddw_resnet18', num_classes=2)
    save_file(two.state_dict(), str(tmp / 'two.safetensors'))
    save_file(timm.create_model('ddw_resnet18', num_classes=5).state_dict(), str(tmp / 'five.safetensors'))
    blob = (tmp / 'two.safetensors').read_bytes()
    (tmp / 'truncated.safetensors').write_bytes(blob[:len(blob) // 2])
    static = timm.create_model('ddw_resnet18', num_classes=2, wiring='static')
    torch.save(dict(arch='ddw_resnet18', epoch=0, state_dict=static.state_dict(),
                    model_args=dict(wiring='static', num_classes=2)), tmp / 'static.pth.tar')

    (tmp / 'earlier_run').mkdir()
    (tmp / 'earlier_run' / 'metrics.json').write_text('{"val_top1": 91.0}')
    (tmp / 'earlier_report').mkdir()
    for name in ('routing.json', 'routing_mean.png', 'routing_class_diff.png'):
        (tmp / 'earlier_report' / name).write_text('an earlier report of other data')
    (tmp / 'earlier_export').mkdir()
    for name in ('config.json', 'README.md'):
        (tmp / 'earlier_export' / name).write_text('{"published": "earlier"}')
    (tmp / 'repo').mkdir()
    (tmp / 'classes.txt').write_text('T-shirt/top\n\nAnkle boot\n')
    (tmp / 'repo' / 'notes.txt').write_text('private notes')
    f['before'] = {k: md5s(tmp / k) for k in ('earlier_run', 'earlier_report', 'earlier_export')}
    f['unwritable'] = unwritable(tmp)
    return f


@pytest.fixture(scope='module')
def batch(setup):
    f, tmp = setup, setup['tmp']
    images, data = str(setup['images']), ['--data-dir', str(setup['images'])]
    routing = ['routing', '--model', 'ddw_resnet18', '--checkpoint', tmp / 'two.safetensors', '--data-dir',
               images + '/val', '--output', tmp / 'r', '-j', '0', '--no-progress', '--img-size', '16']
    cases = dict(
        unknown_model=['train', '--model', 'nope_model'],
        not_ddw=['train', '--model', 'resnet18'],
        device_gpu=['train', '--device', 'gpu'],
        output_is_file=['train', *data, *TINY, '--output', tmp / 'afile'],
        output_unwritable=['train', *data, *TINY, '--output', f['unwritable']],
        no_val=['train', '--data-dir', f['noval'], *TINY],
        no_class_folders=['train', '--data-dir', f['loose'], *TINY],
        one_class=['train', '--data-dir', f['one'], *TINY],
        train_kwargs_no_equals=['train', '--model-kwargs', 'wiring'],
        shortcut_contradicts=['train', '--wiring', 'static', '--model-kwargs', 'wiring=dynamic'],
        train_node_budget=['train', *data, *TINY, '--node-budget', '1.5'],
        random_initial=['train', *data, *TINY, '--initial-checkpoint', tmp / 'random.pth.tar'],
        wrong_initial=['train', *data, *TINY, '--initial-checkpoint', tmp / 'five.safetensors'],
        pretrained_offline=['train', *data, *TINY, '--pretrained'],
        resume_random=['train', '--resume', tmp / 'random.pth.tar'],
        train_existing_output=['train', *data, *TINY, '--output', tmp / 'earlier_run'],
        routing_wiring=[*routing, '--model-kwargs', 'wiring=foo'],
        routing_router_bias=[*routing, '--model-kwargs', 'router_bias=abc'],
        routing_num_classes=[*routing, '--model-kwargs', 'num_classes=ten'],
        routing_no_equals=[*routing, '--model-kwargs', 'wiring'],
        routing_cuda=[*routing, '--model-kwargs', 'num_classes=2', '--device', 'cuda'],
        routing_no_classes=[*routing[:5], '--data-dir', f['loose'] / 'train', *routing[7:], '--model-kwargs',
                            'num_classes=2'],
        routing_mismatch=[*routing[:4], tmp / 'five.safetensors', *routing[5:]],
        routing_random=[*routing[:4], tmp / 'random.pth.tar', *routing[5:]],
        routing_existing_output=[*routing[:8], tmp / 'earlier_report', *routing[9:], '--model-kwargs',
                                 'num_classes=2', '-b', '2', '--amp', '--limit', '3', '--no-plots'],
        export_truncated=['export', tmp / 'truncated.safetensors', tmp / 'e1'],
        export_existing=['export', tmp / 'static.pth.tar', tmp / 'earlier_export'],
        export_beside_notes=['export', tmp / 'static.pth.tar', tmp / 'repo', '--model-kwargs', 'wiring=static'],
        export_wrong_kwargs=['export', tmp / 'static.pth.tar', tmp / 'e2', '--model-kwargs', 'wiring=dynamic'],
        export_label_count=['export', tmp / 'static.pth.tar', tmp / 'e3', '--label-names', 'a', 'b', 'c'],
        export_label_file=['export', tmp / 'static.pth.tar', tmp / 'e4', '--label-names', tmp / 'classes.txt'],
        export_label_args=['export', tmp / 'static.pth.tar', tmp / 'e5', '--label-names', 'cat', 'snow owl'],
        export_folder_again=['export', tmp / 'e4' / 'model.safetensors', tmp / 'e6'],
        push_dry_run=['push', tmp / 'repo', 'org/ddw', '--dry-run'],
        push_no_token=['push', tmp / 'repo', 'org/ddw'],
        hub_configs_missing=['hub-configs', tmp / 'no_hub_configs', '--check'],
        train_help=['train', '--help'],
    )
    results = run_cli_batch(list(cases.values()), tmp)
    return dict(zip(cases, results, strict=True))


ERRORS = {  # case: (command, text of its one error line)
    'unknown_model': ('train', "error: 'nope_model' is not a timm model; DDW models: ddw_efficientnet_b0"),
    'not_ddw': ('train', "error: 'resnet18' is not a DDW model; choose one of ddw_efficientnet_b0"),
    'device_gpu': ('train', "error: device 'gpu' is not a torch device; use 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    'output_is_file': ('train', 'afile is a file, not a folder'),
    'output_unwritable': ('train', 'error: cannot create the output folder'),
    'no_val': ('train', 'noval has no val/ (or validation/) folder to validate on; the training images are never used'),
    'no_class_folders': ('train', 'holds images outside class sub-folders (e.g. loose0.png)'),
    'one_class': ('train', 'has 1 class sub-folder (cat); training needs at least 2 classes'),
    'train_kwargs_no_equals': ('train', "error: --model-kwargs 'wiring': expected KEY=VALUE, e.g. wiring=static"),
    'shortcut_contradicts': ('train', 'error: --wiring static contradicts --model-kwargs wiring=dynamic'),
    'train_node_budget': ('train', 'error: ddw_resnet18: node_budget=1.5 must be None (off) or a share of block nodes'),
    'random_initial': ('train', 'random.pth.tar is not a PyTorch checkpoint or a safetensors file (or it is trunc'),
    'wrong_initial': ('train', 'five.safetensors does not fit ddw_resnet18'),
    'pretrained_offline': ('train', "error: ddw_resnet18: could not load pretrained weights from hf_hub_id="),
    'resume_random': ('train', 'random.pth.tar is not a PyTorch checkpoint or a safetensors file'),
    'routing_wiring': ('routing', "wiring='foo' is not one of ['ba', 'chain', 'dense', 'dynamic'"),
    'routing_router_bias': ('routing', "router_bias='abc' must be a finite number"),
    'routing_num_classes': ('routing', "error: num_classes='ten' must be an integer >= 0"),
    'routing_no_equals': ('routing', "error: --model-kwargs 'wiring': expected KEY=VALUE"),
    'routing_cuda': ('routing', "error: device 'cuda': CUDA is not available here"),
    'routing_no_classes': ('routing', 'holds images outside class sub-folders'),
    'routing_mismatch': ('routing', 'five.safetensors does not fit ddw_resnet18'),
    'routing_random': ('routing', 'random.pth.tar is not a PyTorch checkpoint or a safetensors file'),
    'export_truncated': ('export', 'truncated.safetensors is not a readable safetensors file (truncated or corrupt?)'),
    'export_existing': ('export', 'earlier_export already holds config.json, README.md; nothing was written '
                                  '(--overwrite replaces them)'),
    'export_wrong_kwargs': ('export', "static.pth.tar does not fit ddw_resnet18 (wiring='dynamic'"),
    'export_label_count': ('export', 'error: label_names has 3 names but the model has num_classes=2'),
    'push_no_token': ('push', 'error: no Hugging Face token: set HF_TOKEN or run `hf auth login`'),
    'hub_configs_missing': ('hub-configs', 'no_hub_configs does not exist; generate it with `timm-ddw hub-configs'),
}


@pytest.mark.parametrize('case', sorted(ERRORS))
def test_bad_input_ends_in_one_error_line(batch, case):
    if case == 'routing_cuda' and torch.cuda.is_available():
        pytest.skip('this machine has a GPU')
    command, text = ERRORS[case]
    r = batch[case]
    assert r['rc'] == 2, (r['rc'], r['err'][-2000:])
    line = one_error_line(r['err'], command)
    assert text in line, line
    assert 'weights_only' not in r['err']  # never advised for a file that is not a checkpoint
    if case.startswith(('train', 'output', 'no_', 'one_', 'random', 'wrong', 'pretrained', 'resume')):
        assert 'epoch 1/1' not in r['out']  # refused before training


def test_checkpoint_errors_show_the_differences_and_the_file_read(batch, setup):
    tmp = setup['tmp']
    wrong = batch['wrong_initial']['err']
    assert f"Checkpoint {tmp / 'five.safetensors'} does not fit" in wrong
    assert 'fc.weight: checkpoint (5, 512) vs model (2, 512)' in wrong and 'hf_hub_id' not in wrong
    mismatch = batch['routing_mismatch']['err']
    assert 'fc.weight: checkpoint (5, 512) vs model (1000, 512)' in mismatch and '...' not in mismatch
    assert 'pass the kwargs it was trained with' in mismatch
    for case in ('routing_random', 'resume_random', 'random_initial', 'export_truncated'):
        assert 'kwargs' not in batch[case]['err'] and len(batch[case]['err'].strip().splitlines()) == 1, case
    assert "missing keys (4): layer1.router_weight" in batch['export_wrong_kwargs']['err']


def test_earlier_results_are_never_replaced(batch, setup):
    tmp = setup['tmp']
    for folder, before in setup['before'].items():
        assert md5s(tmp / folder) == before, folder
    run = batch['train_existing_output']
    assert run['rc'] == 0, run['err'][-2000:]
    assert f"-> {tmp / 'earlier_run-1'} ({tmp / 'earlier_run'} already holds files)" in run['out']
    assert (tmp / 'earlier_run-1' / 'model' / 'model.safetensors').is_file()
    report = batch['routing_existing_output']
    assert report['rc'] == 0, report['err'][-2000:]
    assert f"wrote {tmp / 'earlier_report-1'}/ ({tmp / 'earlier_report'} already holds files)" in report['out']
    assert sorted(p.name for p in (tmp / 'earlier_report-1').iterdir()) == ['routing.json', 'routing.npz',
                                                                             'summary.txt']  # no stale PNGs


def test_export_beside_other_files_lists_and_pushes_only_its_own(batch, setup):
    tmp = setup['tmp']
    export = batch['export_beside_notes']
    assert export['rc'] == 0, export['err']
    assert export['out'].strip() == f"wrote {tmp / 'repo'}/: model.safetensors, config.json, README.md"
    assert (tmp / 'repo' / 'notes.txt').read_text() == 'private notes'
    dry = batch['push_dry_run']
    assert dry['rc'] == 0, dry['err']
    assert 'would upload model.safetensors, config.json, README.md from' in dry['out']
    assert 'not uploaded: notes.txt' in dry['out'] and 'token NOT found' in dry['out']


def test_export_label_names_from_the_command_line_a_file_or_the_folder(batch, setup):
    tmp = setup['tmp']
    for case, folder, names in (('export_label_file', 'e4', ['T-shirt/top', 'Ankle boot']),
                                ('export_label_args', 'e5', ['cat', 'snow owl']),
                                ('export_folder_again', 'e6', ['T-shirt/top', 'Ankle boot'])):
        assert batch[case]['rc'] == 0, batch[case]['err']
        config = json.loads((tmp / folder / 'config.json').read_text())
        assert config['label_names'] == names, case
        assert config['num_classes'] == 2 and 'num_classes' not in config['model_args']
        assert config['model_args']['wiring'] == 'static', case  # e6: from e4's config.json
    assert not (tmp / 'e3').exists()


def test_train_help_shows_every_default(batch):
    r = batch['train_help']
    assert r['rc'] == 0
    text = ' '.join(r['out'].split())
    for flag, default in (('--img-size PX', '32'), ('--epochs N', '3'), ('--lr LR', '0.1'), ('--sched', 'cosine'),
                          ('--model MODEL', 'ddw_resnet18'), ('--wiring', 'dynamic'), ('-b N, --batch-size N', '128')):
        start = text.index(flag, text.index('options:'))
        assert f'(default: {default})' in text[start:start + 300], flag
    for flag in ('--data-dir DIR, --data DIR', '--model-kwargs', '--num-classes', '--pretrained', '--resume',
                 '--initial-checkpoint', '--model-ema', '--channels-last'):
        assert flag in text, flag
    assert 'default: True' not in text and 'default: False' not in text and 'default: None' not in text


def test_push_without_network_says_so_at_once(batch, setup, tmp_path):
    folder = setup['tmp'] / 'repo'  # exported by the batch's export_beside_notes
    env = cli_env(tmp_path, HF_TOKEN='hf_dummy_token', HF_ENDPOINT='http://127.0.0.1:9', HF_HUB_OFFLINE='0')
    start = time.perf_counter()
    (r,) = run_cli_batch([['push', folder, 'org/ddw']], tmp_path, env=env)
    assert r['rc'] == 2, r['err'][-2000:]
    line = one_error_line(r['err'], 'push')
    assert 'could not reach the Hugging Face Hub at http://127.0.0.1:9' in line and 'nothing was uploaded' in line
    assert time.perf_counter() - start < 120  # no retries for minutes (the process start is most of it)


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_the_run(setup, tmp_path):
    """SIGINT in epoch 2 or later: exit 130, one line naming last.pth.tar; --resume then completes the run."""
    out = tmp_path / 'run'
    env = cli_env(tmp_path)
    argv = TIMM_DDW + ['train', '--data-dir', str(setup['images']), '--img-size', '16', '-b', '4', '--epochs', '8',
                       '--warmup-steps', '1', '--no-progress', '--output', str(out)]
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / 'last.pth.tar').exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, (proc.returncode, stderr[-2000:])
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and 'Traceback' not in stderr, stderr
    ckpt = out / 'last.pth.tar'
    epoch = int(lines[0].split('interrupted in epoch ')[1].split('/')[0])
    assert lines[0] == (f'timm-ddw train: interrupted in epoch {epoch}/8; saved {ckpt} ({epoch - 1} finished '
                        f'epochs); resume with: timm-ddw train --resume {ckpt}')
    saved = torch.load(ckpt, weights_only=False)
    assert saved['epoch'] == epoch - 2 and len(saved['history']) == epoch - 1
    assert {'state_dict', 'optimizer', 'scheduler', 'args'} <= set(saved)
    assert not (out / 'metrics.json').exists()

    resumed = subprocess.run(TIMM_DDW + ['train', '--resume', str(ckpt), '--no-progress'], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f'resuming from {ckpt} after epoch {epoch - 1}/8' in resumed.stdout
    metrics = json.loads((out / 'metrics.json').read_text())
    assert [h['epoch'] for h in metrics['history']] == list(range(1, 9)) and metrics['resumed_from'] == str(ckpt)


def test_library_takes_plain_arguments():
    """Everything a command does is a library call without argparse: no Namespace in any signature."""
    import importlib
    import inspect

    for name in ('train', 'routing', 'routing_report', 'routing_plots', 'hub', 'loading', 'data', 'runtime'):
        module = importlib.import_module(f'timm_ddw.{name}')
        for attr in module.__all__:
            obj = getattr(module, attr)
            members = [getattr(obj, k) for k in vars(obj) if not k.startswith('__')] if inspect.isclass(obj) else []
            for fn in [obj, *members]:
                if callable(fn) and not inspect.isclass(fn):
                    try:
                        sig = inspect.signature(fn)
                    except (TypeError, ValueError):
                        continue
                    assert 'Namespace' not in str(sig), f'timm_ddw.{name}.{attr}{sig}'
    assert not hasattr(importlib.import_module('timm_ddw.train'), 'register_cli')


def test_node_budget_flag_fills_the_model_kwargs():
    import argparse

    from timm_ddw.cli import train as train_cli
    parser = argparse.ArgumentParser()
    train_cli.add_parser(parser.add_subparsers())
    config = train_cli.config_from_args(parser.parse_args(['train', '--node-budget', '0.6']))
    assert config.model_kwargs['node_budget'] == 0.6
    with pytest.raises(ValueError, match='--node-budget 0.5 contradicts --model-kwargs node_budget=0.6'):
        train_cli.config_from_args(parser.parse_args(['train', '--node-budget', '0.5', '--model-kwargs',
                                                      'node_budget=0.6']))
