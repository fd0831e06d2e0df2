"""Export, publish and load DDW weights; offline against a real Hugging Face cache laid out on disk."""
import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

import timm_ddw
from timm_ddw.hub import (
    DdwCheckpointError,
    check_hub_configs,
    ddw_model_args,
    export_checkpoint,
    export_folder,
    hub_config,
    push_folder,
)
from timm_ddw.loading import load_model
from timm_ddw.models._ddw import DDW_DEFAULTS

ROOT = Path(__file__).resolve().parents[1]
X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
# one model per family: its twin's default Hub repo holds the weights pretrained=True loads
FAMILIES = {'ddw_resnet18': 'resnet18', 'ddw_mobilenetv2_100': 'mobilenetv2_100', 'ddw_regnetx_600m': 'regnetx_006'}


def randomise_(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(('router_bias', 'router_weight')):
                p.normal_(0, 1, generator=g)  # edges open and closed, per sample
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._NormBase):
                m.weight.uniform_(0.5, 1.2, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
    return model


def add_to_cache(cache: Path, repo_id: str, files: dict) -> Path:
    """A real huggingface_hub cache entry: blobs named by hash, snapshot symlinks, refs/main."""
    repo = cache / ('models--' + repo_id.replace('/', '--'))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snap = repo / 'snapshots' / commit
    (repo / 'blobs').mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    (repo / 'refs').mkdir(exist_ok=True)
    (repo / 'refs' / 'main').write_text(commit)
    for name, data in files.items():
        data = Path(data).read_bytes() if isinstance(data, Path) else data
        blob = repo / 'blobs' / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / name).symlink_to(os.path.relpath(blob, snap))
    return snap


@pytest.fixture(scope='module')
def static_model():
    return randomise_(timm.create_model('ddw_resnet18', wiring='static', num_classes=10)).eval()


@pytest.fixture(scope='module')
def exported(tmp_path_factory, static_model):
    out = tmp_path_factory.mktemp('export') / 'ddw-resnet18-static'
    recipe = 'model: ddw_resnet18\nepochs: 3\nlr: 0.1\n'
    export_folder(static_model, out, metrics=dict(top1=91.25, dataset='fashion-mnist', img_size=64),
                  recipe=recipe, repo_id='org/ddw-resnet18-static')
    return out


def test_export_folder_contents(exported, static_model):
    assert sorted(p.name for p in exported.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    config = json.loads((exported / 'config.json').read_text())
    assert config['architecture'] == 'ddw_resnet18' and config['num_classes'] == 10
    # num_classes at the top level only, as transformers needs it; in_chans stays in model_args
    assert config['model_args'] == dict(in_chans=3, wiring='static', router_bias=3.0,
                                        threshold_init=0.0, gate='ste', wiring_seed=0, aggregation='bounded',
                                        node_budget=None, removal='router',
                                        global_pool='avg')
    assert 'label_names' not in config  # none given: none invented
    cfg = config['pretrained_cfg']
    assert 'hf_hub_id' not in cfg and 'tag' not in cfg  # the twin's chain-init source is not carried over
    assert cfg['input_size'] == [3, 224, 224] and cfg['crop_pct'] == 0.95 and cfg['license'] == 'apache-2.0'
    weights = safetensors.torch.load_file(exported / 'model.safetensors')
    assert weights.keys() == static_model.state_dict().keys()
    assert all(torch.equal(v, weights[k]) for k, v in static_model.state_dict().items())
    card = (exported / 'README.md').read_text()
    for text in ('# Model card for org/ddw-resnet18-static', "**wiring:** `'static'`", '| Top-1 accuracy (%) | 91.25 |',
                 '- fashion-mnist', 'epochs: 3', 'title     = {Differentiable Dynamic Wirings for Neural Networks}',
                 "timm.create_model('hf-hub:org/ddw-resnet18-static', pretrained=True)",
                 'layer1: 2 blocks, 3 nodes, 3 edges'):
        assert text in card, text


def test_local_dir_round_trip(exported, static_model):
    model = timm.create_model(f'local-dir:{exported}', pretrained=True).eval()
    assert {s.wiring for s in timm_ddw.graph_stages(model).values()} == {'static'}
    with torch.no_grad():
        assert torch.equal(model(X), static_model(X))


def test_export_refuses_inconsistent_model_args(static_model, tmp_path):
    # an entrypoint called directly records no arguments: the wiring and gate are read off the stages
    direct = timm_ddw.models.ddw_regnetx_600m(wiring='static', gate='psi', device='meta')
    args = hub_config(direct)['model_args']
    assert (args['wiring'], args['gate']) == ('static', 'psi')
    with pytest.raises(ValueError, match="wiring='dynamic' contradicts the model.*wiring='static'"):
        export_folder(static_model, tmp_path, model_args=dict(wiring='dynamic'))
    with pytest.raises(ValueError, match='expected a ddw_\\* model'):
        export_folder(timm.create_model('resnet18'), tmp_path)
    with pytest.raises(ValueError, match='features_only models are not exported'):
        export_folder(timm.create_model('ddw_resnet18', features_only=True, device='meta'), tmp_path)


def test_export_checkpoint_from_train_checkpoint(tmp_path, static_model):
    ema = {k: v * 2 if v.is_floating_point() else v for k, v in static_model.state_dict().items()}
    ckpt = tmp_path / 'last.pth.tar'
    torch.save(dict(arch='ddw_resnet18', epoch=3, state_dict=static_model.state_dict(), state_dict_ema=ema,
                    args=argparse.Namespace(model='ddw_resnet18', model_kwargs=dict(wiring='static'))), ckpt)
    (tmp_path / 'recipe.yaml').write_text('epochs: 3\n')
    out = tmp_path / 'out'
    export_checkpoint(ckpt, out, metrics={'top1': 90.5}, recipe=tmp_path / 'recipe.yaml', tag='fmnist_e3')
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    config = json.loads((out / 'config.json').read_text())
    assert config['model_args']['wiring'] == 'static' and config['num_classes'] == 10
    assert config['pretrained_cfg']['tag'] == 'fmnist_e3'
    weights = safetensors.torch.load_file(out / 'model.safetensors')
    assert all(torch.equal(weights[k], v) for k, v in ema.items())  # EMA preferred
    assert '| Top-1 accuracy (%) | 90.5 |' in (out / 'README.md').read_text()

    # the same checkpoint exported as another wiring fails, naming the file read and the keys
    with pytest.raises(DdwCheckpointError) as e:
        export_checkpoint(ckpt, tmp_path / 'bad', model_args=dict(wiring='dynamic'))
    assert f"Checkpoint {ckpt} does not fit ddw_resnet18 (wiring='dynamic'" in str(e.value)
    assert 'missing keys (4): layer1.router_weight' in str(e.value) and 'hf_hub_id' not in str(e.value)
    assert not (tmp_path / 'bad').exists()


def test_export_never_replaces_files(exported, static_model, tmp_path):
    before = {p.name: p.read_bytes() for p in exported.iterdir()}
    with pytest.raises(FileExistsError, match='already holds model.safetensors, config.json, README.md; nothing'):
        export_folder(static_model, exported, metrics=dict(top1=1.0))
    assert {p.name: p.read_bytes() for p in exported.iterdir()} == before
    folder = tmp_path / 'repo'
    folder.mkdir()
    (folder / 'notes.txt').write_text('mine')
    export_folder(static_model, folder)  # unrelated files do not block an export and stay as they are
    assert (folder / 'notes.txt').read_text() == 'mine'
    export_folder(static_model, folder, overwrite=True, metrics=dict(top1=2.5))
    assert '| Top-1 accuracy (%) | 2.5 |' in (folder / 'README.md').read_text()


def test_exported_config_of_a_small_model_drops_the_twins_test_size(static_model, tmp_path):
    model = timm.create_model('ddw_resnet18', in_chans=1, num_classes=10)
    config = hub_config(model, data_config=dict(input_size=(1, 32, 32), mean=(0.286,), std=(0.353,)))
    cfg = config['pretrained_cfg']
    assert cfg['input_size'] == [1, 32, 32] and 'test_input_size' not in cfg and cfg['mean'] == [0.286]
    assert hub_config(static_model)['pretrained_cfg']['test_input_size'] == [3, 288, 288]  # the twin's, unchanged


NAMES = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot']


def test_config_is_timms_layout_with_num_classes_only_at_the_top(static_model, tmp_path):
    from timm.models._hub import save_config_for_hf
    config = hub_config(static_model, label_names=NAMES)
    save_config_for_hf(static_model, str(tmp_path / 'timm.json'), model_args=ddw_model_args(static_model),
                       model_config=dict(label_names=NAMES))
    timms = json.loads((tmp_path / 'timm.json').read_text())
    assert list(config) == list(timms)  # the same fields, in timm's order
    assert config['num_classes'] == timms['num_classes'] == 10 and config['label_names'] == NAMES
    # timm 1.0.31 also copies num_classes into model_args, where transformers refuses it: the only difference
    assert timms['model_args'].pop('num_classes') == 10 and config['model_args'] == timms['model_args']
    assert set(DDW_DEFAULTS) <= set(config['model_args']) and config['model_args']['in_chans'] == 3


def test_label_names_are_checked_before_anything_is_written(static_model, tmp_path):
    out = tmp_path / 'out'
    for names, message in ((NAMES[:9], 'label_names has 9 names but the model has num_classes=10'),
                           (NAMES[:9] + ['Bag'], "label_names repeats 'Bag'; each class needs its own name"),
                           ('T-shirt/top', 'label_names must be a list of class names, got str'),
                           (NAMES[:9] + [''], "label_names must be non-empty strings, got ''")):
        with pytest.raises(ValueError, match=f'^{re.escape(message)}$'):
            export_folder(static_model, out, label_names=names)
        assert not out.exists()


def old_layout(folder: Path, dest: Path) -> Path:
    """``folder`` as exports before label_names wrote it: num_classes and in_chans also in model_args."""
    shutil.copytree(folder, dest)
    config = json.loads((dest / 'config.json').read_text())
    config.pop('label_names', None)
    config['model_args'] = dict(num_classes=config['num_classes'], **config['model_args'])
    (dest / 'config.json').write_text(json.dumps(config, indent=2) + '\n')
    return dest


def test_both_layouts_load_and_old_folders_reexport_in_the_new_one(exported, static_model, tmp_path):
    old = old_layout(exported, tmp_path / 'old')
    assert json.loads((old / 'config.json').read_text())['model_args']['num_classes'] == 10
    for folder in (exported, old):
        for model in (timm.create_model(f'local-dir:{folder}', pretrained=True).eval(),
                      load_model('ddw_resnet18', checkpoint=folder / 'model.safetensors')[0].eval()):
            assert model.num_classes == 10
            assert {s.wiring for s in timm_ddw.graph_stages(model).values()} == {'static'}
            with torch.no_grad():
                assert torch.equal(model(X), static_model(X))
    # the weights of a folder export with the folder's architecture and arguments, in the new layout
    new = export_checkpoint(old / 'model.safetensors', tmp_path / 'new', label_names=NAMES)
    config = json.loads((new / 'config.json').read_text())
    assert 'num_classes' not in config['model_args'] and config['model_args']['wiring'] == 'static'
    assert config['num_classes'] == 10 and config['label_names'] == NAMES
    again = export_checkpoint(new / 'model.safetensors', tmp_path / 'again')  # names kept from config.json
    assert json.loads((again / 'config.json').read_text())['label_names'] == NAMES
    assert '- **Classes:** 10 (T-shirt/top, Trouser, Pullover,' in (again / 'README.md').read_text()


def test_export_checkpoint_takes_the_class_names_train_stored(static_model, tmp_path):
    ckpt = tmp_path / 'last.pth.tar'
    torch.save(dict(arch='ddw_resnet18', state_dict=static_model.state_dict(), label_names=NAMES,
                    model_args=dict(wiring='static', num_classes=10, in_chans=3)), ckpt)
    config = json.loads((export_checkpoint(ckpt, tmp_path / 'a') / 'config.json').read_text())
    assert config['label_names'] == NAMES and 'label_names' not in config['pretrained_cfg']  # timm's place
    given = [n.upper() for n in NAMES]
    config = json.loads((export_checkpoint(ckpt, tmp_path / 'b', label_names=given) / 'config.json').read_text())
    assert config['label_names'] == given  # given names win over stored ones
    assert timm.create_model(f'local-dir:{tmp_path / "b"}', pretrained=True).pretrained_cfg['label_names'] == given
    with pytest.raises(ValueError, match='label_names has 2 names but the model has num_classes=10'):
        export_checkpoint(ckpt, tmp_path / 'c', label_names=['a', 'b'])


def test_push(exported, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import build_hf_headers

    monkeypatch.setenv('HF_TOKEN', 'hf_dummy_token_for_test')
    folder = tmp_path / 'with-notes'
    shutil.copytree(exported, folder)
    (folder / 'notes.txt').write_text('not for the Hub')
    plan = push_folder(folder, 'org/ddw-resnet18-static', dry_run=True)
    assert plan['files'] == ['model.safetensors', 'config.json', 'README.md'] and plan['token_found']
    assert plan['skipped'] == ['notes.txt']

    calls = []

    def create_repo(self, repo_id, **kw):
        calls.append(('create_repo', repo_id, kw, build_hf_headers(token=self.token)['authorization']))
        return huggingface_hub.RepoUrl(f'https://huggingface.co/{repo_id}')

    def upload_folder(self, **kw):
        calls.append(('upload_folder', kw['repo_id'], kw, sorted(os.listdir(kw['folder_path']))))
        return 'commit'

    monkeypatch.setattr(huggingface_hub.HfApi, 'create_repo', create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, 'upload_folder', upload_folder)
    push_folder(folder, 'org/ddw-resnet18-static', private=True)
    assert calls[0][:2] == ('create_repo', 'org/ddw-resnet18-static') and calls[0][2]['private'] is True
    assert calls[0][3] == 'Bearer hf_dummy_token_for_test'  # the token the real call would send
    assert calls[1][1] == 'org/ddw-resnet18-static'
    assert calls[1][2]['allow_patterns'] == ['model.safetensors', 'config.json', 'README.md']  # not notes.txt

    bad = tmp_path / 'pickled'
    shutil.copytree(exported, bad)
    torch.save({}, bad / 'pytorch_model.bin')
    with pytest.raises(ValueError, match='pickle files'):
        push_folder(bad, 'org/x', dry_run=True)
    with pytest.raises(ValueError, match="repo_id='x' must be 'ORG/NAME'"):
        push_folder(exported, 'x', dry_run=True)


def test_timms_push_to_hf_hub_publishes_a_ddw_model_timm_loads(static_model, tmp_path, monkeypatch):
    """README points to it: with ddw_model_args and safe_serialization=True, timm loads what it uploads."""
    import huggingface_hub

    uploaded = tmp_path / 'uploaded'
    monkeypatch.setattr(huggingface_hub.HfApi, 'create_repo',
                        lambda self, repo_id, **kw: huggingface_hub.RepoUrl(f'https://huggingface.co/{repo_id}'))
    monkeypatch.setattr(huggingface_hub.HfApi, 'file_exists', lambda self, **kw: False)
    monkeypatch.setattr(huggingface_hub.HfApi, 'upload_folder',
                        lambda self, **kw: shutil.copytree(kw['folder_path'], uploaded))
    timm.models.push_to_hf_hub(static_model, 'org/ddw-timm-push', model_args=ddw_model_args(static_model),
                               safe_serialization=True)
    assert sorted(p.name for p in uploaded.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    assert json.loads((uploaded / 'config.json').read_text())['model_args']['num_classes'] == 10  # timm's copy
    model = timm.create_model(f'local-dir:{uploaded}', pretrained=True).eval()
    assert {s.wiring for s in timm_ddw.graph_stages(model).values()} == {'static'}
    with torch.no_grad():
        assert torch.equal(model(X), static_model(X))


def test_hub_configs_in_sync(tmp_path):
    assert check_hub_configs(ROOT / 'hub_configs') == [], 'run `timm-ddw hub-configs hub_configs`'
    shutil.copytree(ROOT / 'hub_configs', tmp_path / 'h')
    path = tmp_path / 'h' / 'ddw_resnet18' / 'config.json'
    path.write_text(path.read_text().replace('"dynamic"', '"static"'))
    assert check_hub_configs(tmp_path / 'h') == ['ddw_resnet18/config.json']
    with pytest.raises(FileNotFoundError, match='does not exist; generate it with `timm-ddw hub-configs'):
        check_hub_configs(tmp_path / 'missing')


SCRIPT = textwrap.dedent('''
    import json, sys, torch, timm, timm_ddw
    import timm.models._hub as hub
    requested = []
    real = hub.hf_hub_download
    def recording(repo_id, filename, **kw):
        requested.append(f"{repo_id}/{filename}")
        return real(repo_id, filename, **kw)
    hub.hf_hub_download = recording
    x = torch.load(sys.argv[1])
    res = {}
    for name, twin in json.loads(sys.argv[2]).items():
        model = timm.create_model(name, pretrained=True).eval()
        ref = timm.create_model(twin, pretrained=True).eval()
        with torch.no_grad():
            res[name] = (model(x) - ref(x)).abs().max().item()
    model = timm.create_model('hf-hub:org/ddw-resnet18-static', pretrained=True).eval()
    with torch.no_grad():
        torch.save(model(x), sys.argv[3])
    res['wirings'] = sorted({s.wiring for s in timm_ddw.graph_stages(model).values()})
    for key, name in (('corrupt', 'hf-hub:org/corrupt'), ('wrong_arch', 'hf-hub:org/wrong-arch'),
                      ('unknown_arch', 'hf-hub:org/unknown-arch'), ('missing_repo', 'hf-hub:org/missing'),
                      ('missing_twin', 'ddw_efficientnet_b0')):
        try:
            timm.create_model(name, pretrained=True)
            res[key] = 'loaded'
        except Exception as e:
            res[key] = f"{type(e).__name__}: {e}"
    res['requested'] = requested
    print(json.dumps(res))
''')


def test_offline_hub_cache_subprocess(tmp_path, exported, static_model):
    cache = tmp_path / 'hf'
    twins = {}
    for i, (name, twin) in enumerate(FAMILIES.items()):
        model = randomise_(timm.create_model(twin), seed=i)
        safetensors.torch.save_file(model.state_dict(), tmp_path / f'{twin}.safetensors')
        repo = timm.models.get_pretrained_cfg(twin).hf_hub_id
        add_to_cache(cache, repo, {'model.safetensors': tmp_path / f'{twin}.safetensors'})
        twins[name] = twin
    files = {f: exported / f for f in ('config.json', 'model.safetensors', 'README.md')}
    add_to_cache(cache, 'org/ddw-resnet18-static', files)
    weights = (exported / 'model.safetensors').read_bytes()
    add_to_cache(cache, 'org/corrupt', dict(files, **{'model.safetensors': weights[:len(weights) // 2]}))
    other = tmp_path / 'other'
    export_folder(timm.create_model('ddw_mobilenetv2_100', num_classes=10, wiring='static'), other)
    add_to_cache(cache, 'org/wrong-arch', dict(files, **{'model.safetensors': other / 'model.safetensors'}))
    config = json.loads((exported / 'config.json').read_text())
    add_to_cache(cache, 'org/unknown-arch', dict(files, **{'config.json': json.dumps(
        dict(config, architecture='ddw_resnet9000')).encode()}))
    torch.save(X, tmp_path / 'x.pt')

    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
    env.pop('HF_HOME', None)
    proc = subprocess.run([sys.executable, '-c', SCRIPT, str(tmp_path / 'x.pt'), json.dumps(twins),
                           str(tmp_path / 'y.pt')], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])

    for name, twin in twins.items():
        assert res[name] <= 1e-4, (name, res[name])
        repo = timm.models.get_pretrained_cfg(twin).hf_hub_id
        assert f'{repo}/model.safetensors' in res['requested']  # through hf_hub_download
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / 'y.pt'), static_model(X))
    assert res['wirings'] == ['static']
    assert res['corrupt'].startswith('DdwCheckpointError: ddw_resnet18: could not load pretrained weights '
                                     "from hf_hub_id='org/corrupt': SafetensorError"), res['corrupt']
    assert res['wrong_arch'].startswith("DdwCheckpointError: Checkpoint from hf_hub_id='org/wrong-arch' does "
                                        "not fit ddw_resnet18 (wiring='static'"), res['wrong_arch']
    assert 'unexpected keys' in res['wrong_arch'] and 'missing keys' in res['wrong_arch']
    assert res['unknown_arch'] == 'RuntimeError: Unknown model (ddw_resnet9000)', res['unknown_arch']
    assert res['missing_repo'].startswith('LocalEntryNotFoundError'), res['missing_repo']
    assert res['missing_twin'].startswith("DdwCheckpointError: ddw_efficientnet_b0: could not load pretrained "
                                          "weights from hf_hub_id='timm/efficientnet_b0.ra_in1k'"), res['missing_twin']
