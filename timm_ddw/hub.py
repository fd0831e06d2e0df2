"""Publishing DDW weights on the Hugging Face Hub, and loading them back.

A published DDW repository is a timm repository: ``model.safetensors``, a ``config.json`` in
timm's format whose ``architecture``, ``num_classes`` and ``model_args`` (wiring, router settings,
``in_chans``, ...) rebuild the model, with ``label_names`` when the classes are known, and a model
card. Once ``timm_ddw`` is imported, ``timm.create_model('hf-hub:ORG/REPO', pretrained=True)`` and
transformers' timm wrapper (``AutoModelForImageClassification``, ``pipeline('image-classification')``)
load it. ``num_classes`` is kept out of ``model_args``: transformers passes it to timm itself, next
to ``model_args``. The library behind the commands (``timm-ddw COMMAND -h``):

- ``export``: a train.py checkpoint -> a Hub-ready folder (:func:`export_checkpoint`);
- ``push``: upload such a folder with huggingface_hub (:func:`push_folder`);
- ``hub-configs``: regenerate ``hub_configs/<model>/{config.json,README.md}`` (:func:`write_hub_configs`).

Nothing here replaces a file silently: an export into a folder that already holds its files is
refused unless ``overwrite=True``, and a push uploads only the files an export writes.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch.nn as nn

from .capture import graph_stages
from .models import TWINS
from .models._ddw import DDW_DEFAULTS, DdwMixin
from .models._pretrained import DdwCheckpointError, load_checked

__all__ = [
    'DdwCheckpointError', 'EXPORT_FILES', 'TWINS', 'check_label_names', 'export_folder', 'export_checkpoint',
    'push_folder', 'hub_config', 'model_card', 'write_hub_configs', 'check_hub_configs']


WEIGHTS_NAME = 'model.safetensors'
EXPORT_FILES = (WEIGHTS_NAME, 'config.json', 'README.md')  # what export_folder writes and push_folder uploads
PICKLE_SUFFIXES = ('.bin', '.pt', '.pth', '.pkl', '.pickle', '.ckpt', '.tar')
PAPER = 'Differentiable Dynamic Wirings for Neural Networks'
CITATIONS = (
    """@inproceedings{yuan2021ddw,
  title     = {Differentiable Dynamic Wirings for Neural Networks},
  author    = {Yuan, Kun and Li, Quanquan and Guo, Shaopeng and Chen, Dapeng and Zhou, Aojun and """
    """Yu, Fengwei and Liu, Ziwei},
  booktitle = {Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},
  year      = {2021}
}""",
    """@misc{rw2019timm,
  author = {Ross Wightman},
  title = {PyTorch Image Models},
  year = {2019},
  publisher = {GitHub},
  journal = {GitHub repository},
  doi = {10.5281/zenodo.4414861},
  howpublished = {\\url{https://github.com/huggingface/pytorch-image-models}}
}""",
)
# metric name -> label in the model card; other keys are listed as given
METRIC_FIELDS = {
    'top1': 'Top-1 accuracy (%)', 'top5': 'Top-5 accuracy (%)', 'dataset': 'Evaluation data set',
    'img_size': 'Evaluation image size', 'crop_pct': 'Evaluation crop_pct'}
PathLike = Union[str, Path]
# constructor arguments config.json keeps at its top level, not in model_args: transformers' timm
# wrapper passes them to timm.create_model itself, next to model_args (a copy there is a TypeError)
TOP_LEVEL_ARGS = ('num_classes',)


def check_label_names(label_names: Optional[Sequence[str]], num_classes: int) -> Optional[List[str]]:
    """``label_names`` as a list, one distinct non-empty name per class, or ValueError.

    Clients map classifier index i to ``label_names[i]``: a list of another length (or with
    repeats) would name the wrong classes, so it is refused rather than written.
    """
    if label_names is None:
        return None
    if isinstance(label_names, (str, bytes)) or not isinstance(label_names, Sequence):
        raise ValueError(f'label_names must be a list of class names, got {type(label_names).__name__}')
    names = list(label_names)
    if len(names) != num_classes:
        raise ValueError(f'label_names has {len(names)} names but the model has num_classes={num_classes}')
    bad = [n for n in names if not isinstance(n, str) or not n.strip()]
    if bad:
        raise ValueError(f'label_names must be non-empty strings, got {bad[0]!r}')
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f'label_names repeats {", ".join(map(repr, repeated))}; each class needs its own name')
    return names


def _unwrap(model: nn.Module) -> nn.Module:
    for attr in ('module', '_orig_mod'):  # DDP / torch.compile wrappers
        model = getattr(model, attr, model)
    arch = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture')
    if arch not in TWINS or not isinstance(model, DdwMixin):
        raise ValueError(f'expected a ddw_* model built by timm.create_model (one of {sorted(TWINS)}), got '
                         f'{type(model).__name__} with architecture={arch!r}; features_only models are not exported')
    return model


def ddw_model_args(model: nn.Module, model_args: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Every argument needed to rebuild ``model``: the DDW ones always, plus timm's recorded ones.

    The wiring and gate are read off the graph stages; explicit ``model_args`` that contradict
    them are an error. The result is checked by rebuilding the model on the meta device.
    """
    import timm
    from timm.models import get_model_args

    model = _unwrap(model)
    stage = next(iter(graph_stages(model).values()))
    recorded = dict(getattr(model, '_model_args', {}))
    args = {k: recorded.get(k, v) for k, v in DDW_DEFAULTS.items()}
    args.update(wiring=stage.wiring, gate=stage.gate, aggregation=stage.aggregation, node_budget=stage.node_budget,
                removal=stage.removal)
    for key in ('wiring', 'gate'):
        if model_args and key in model_args and model_args[key] != args[key]:
            raise ValueError(f'model_args {key}={model_args[key]!r} contradicts the model, whose stages use '
                             f'{key}={args[key]!r}')
    args.update(model_args or {})
    args = get_model_args(model, args)

    arch = model.pretrained_cfg['architecture']
    rebuilt = timm.create_model(arch, device='meta', **args)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    new = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    graphs = [s.preds for s in graph_stages(model).values()]
    if own != new or graphs != [s.preds for s in graph_stages(rebuilt).values()]:
        raise ValueError(f'model_args {args} do not rebuild this {arch}: its state dict or graphs differ; '
                         'pass the arguments the model was created with (e.g. wiring_seed) as model_args')
    return args


def hub_config(
        model: nn.Module,
        model_args: Optional[Mapping[str, Any]] = None,
        tag: Optional[str] = None,
        license: Optional[str] = None,
        description: Optional[str] = None,
        data_config: Optional[Mapping[str, Any]] = None,
        label_names: Optional[Sequence[str]] = None,
) -> Dict[str, Any]:
    """``config.json`` of a published DDW model, in timm's format (timm's own writer).

    The source-weight fields of ``pretrained_cfg`` (hub id, chain-init tag and description) are
    replaced: the exported weights are a new source. ``data_config`` (input_size, mean, std,
    crop_pct, interpolation, ...) records the preprocessing the weights were trained with.
    ``label_names`` (one per class) name the classes for timm and transformers. ``num_classes``
    sits at the top level only (see ``TOP_LEVEL_ARGS``), so that transformers can load the folder.
    """
    from timm.models._hub import save_config_for_hf

    model = _unwrap(model)
    args = ddw_model_args(model, model_args)
    names = check_label_names(label_names, model.num_classes)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / 'config.json'
        # timm resolves the data config against the model (so a 1-channel model needs no ImageNet
        # mean) and drops the twin's test_input_size once another input_size is given
        save_config_for_hf(model, str(path), model_args=args, data_config=dict(data_config or {}) or None,
                           model_config=dict(label_names=names) if names else None)
        config = json.loads(path.read_text())
    for key in TOP_LEVEL_ARGS:  # timm also copies them into model_args; transformers refuses the copy
        value = config.get('model_args', {}).pop(key, None)
        if value is not None and value != config[key]:
            raise ValueError(f'model_args {key}={value!r} differs from the model\'s {key}={config[key]!r}')
    cfg = config['pretrained_cfg']
    for key in ('tag', 'origin_url', 'description', 'notes', 'paper_ids'):
        cfg.pop(key, None)
    cfg.update({k: list(v) if isinstance(v, tuple) else v for k, v in (data_config or {}).items()})
    if tag:
        cfg['tag'] = tag
    if license:
        cfg['license'] = license
    twin = TWINS[config['architecture']]
    cfg['description'] = description or (
        f"{config['architecture']}: timm's {twin} with Differentiable Dynamic Wirings "
        f"(wiring={args['wiring']!r}), exported by timm-ddw.")
    cfg['paper_name'] = PAPER
    return config


def _stage_lines(model: nn.Module) -> List[str]:
    lines = []
    for name, stage in graph_stages(model).items():
        edges = sum(len(p) for p in stage.preds)
        n = stage.num_blocks
        lines.append(f"{name}: {n} block{'s' * (n != 1)}, {n + 1} nodes, {edges} edge{'s' * (edges != 1)}")
    return lines


def _recipe_text(recipe: Union[None, str, Path, Mapping[str, Any]]) -> Optional[str]:
    import yaml
    if recipe is None:
        return None
    if isinstance(recipe, Mapping):
        return yaml.safe_dump(dict(recipe), sort_keys=False).strip()
    if isinstance(recipe, Path) or (isinstance(recipe, str) and '\n' not in recipe and Path(recipe).is_file()):
        return Path(recipe).read_text().strip()
    return str(recipe).strip()


def model_card(
        config: Mapping[str, Any],
        model: nn.Module,
        repo_id: Optional[str] = None,
        metrics: Optional[Mapping[str, Any]] = None,
        recipe: Union[None, str, Path, Mapping[str, Any]] = None,
) -> str:
    """The README.md of a published DDW model: details, training recipe, metrics, citation."""
    from . import __version__

    arch = config['architecture']
    twin = TWINS[arch]
    args = config.get('model_args', {})
    cfg = config['pretrained_cfg']
    metrics = dict(metrics or {})
    repo = repo_id or f'ORG/{arch}'
    total = sum(p.numel() for p in model.parameters())
    routing = sum(p.numel() for n, p in model.named_parameters() if n.rpartition('.')[2] in (
        'router_weight', 'router_bias', 'tau'))
    lines = ['---', 'tags:', '- image-classification', '- timm', '- timm-ddw', '- dynamic-wiring',
             'library_name: timm', f"license: {cfg.get('license') or 'apache-2.0'}"]
    if metrics.get('dataset'):
        lines += ['datasets:', f"- {str(metrics['dataset']).lower()}"]
    lines += ['---', f'# Model card for {repo}', '',
              f"A Differentiable Dynamic Wirings (DDW; Yuan et al., ICCV 2021) {arch}: timm's `{twin}` "
              'with the blocks of each stage wired as a complete DAG whose edge weights a router predicts '
              'per sample (edges below a learned threshold are dropped). Built with '
              f'timm-ddw {__version__}.', '', '## Model Details',
              '- **Model type:** image classification / feature backbone',
              f'- **Architecture:** `{arch}` (timm twin: `{twin}`)',
              f"- **Weights:** {cfg.get('description', '')}"]
    for key in DDW_DEFAULTS:
        lines.append(f'- **{key}:** `{args.get(key, DDW_DEFAULTS[key])!r}`')
    lines.append('- **Graph stages:**')
    lines += [f'  - {s}' for s in _stage_lines(model)]
    lines += [f'- **Params (M):** {total / 1e6:.2f} (routers and thresholds: {routing / 1e6:.3f})',
              f"- **Classes:** {config['num_classes']}" + _names_text(config.get('label_names')),
              f"- **Image size:** train {tuple(cfg['input_size'])}"
              + (f", test {tuple(cfg['test_input_size'])}" if cfg.get('test_input_size') else ''),
              f"- **Preprocessing:** crop_pct {cfg.get('crop_pct')}, {cfg.get('interpolation')} interpolation, "
              f"mean {tuple(cfg.get('mean', ()))}, std {tuple(cfg.get('std', ()))}",
              f"- **Paper:** {PAPER}", '', '## Training recipe']
    text = _recipe_text(recipe)
    lines += (['```yaml', text, '```'] if text else
              ['_Not recorded. Fill in the train.py recipe (YAML) and command used to produce these weights._'])
    lines += ['', '## Metrics', '', '| metric | value |', '|---|---|']
    for key, label in METRIC_FIELDS.items():
        value = metrics.pop(key, None)
        lines.append(f"| {label} | {'—' if value is None else value} |")
    lines += [f'| {k} | {v} |' for k, v in metrics.items()]
    lines += ['', '## Usage', '', '```python', 'import timm', 'import timm_ddw  # registers the ddw_* models',
              '', f"model = timm.create_model('hf-hub:{repo}', pretrained=True).eval()",
              'data_config = timm.data.resolve_model_data_config(model)',
              'transform = timm.data.create_transform(**data_config, is_training=False)',
              'with timm_ddw.capture_routing(model) as routing:  # optional: per-sample adjacency matrices',
              '    logits = model(transform(image).unsqueeze(0))', '```', '',
              "With transformers (its timm wrapper builds the model with timm, so `import timm_ddw` first):", '',
              '```python', 'import timm_ddw  # registers the ddw_* models',
              'from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline', '']
    if cfg['input_size'][0] == 3:
        lines += [f"classify = pipeline('image-classification', model='{repo}')",
                  'print(classify(image))  # [{\'label\': ..., \'score\': ...}, ...]', '']
    else:  # pipeline() converts every image to RGB, which a model of other channels cannot take
        lines += [f"# pipeline() feeds RGB images; this model takes {cfg['input_size'][0]} channel(s)",
                  "image = image.convert('L')" if cfg['input_size'][0] == 1 else '# image: an array of those channels']
    lines += [f"processor = AutoImageProcessor.from_pretrained('{repo}')",
              f"model = AutoModelForImageClassification.from_pretrained('{repo}').eval()",
              "logits = model(**processor(image)).logits",
              'print(model.config.id2label[logits.argmax(-1).item()])', '```', '', '## Citation']
    for c in CITATIONS:
        lines += ['```bibtex', c, '```']
    return '\n'.join(lines) + '\n'


def _names_text(names: Optional[Sequence[str]], most: int = 20) -> str:
    if not names:
        return ''
    shown = ', '.join(names[:most]) + (f', ... ({len(names) - most} more)' if len(names) > most else '')
    return f' ({shown})'


def _save_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file
    tensors = {k: v.detach().to('cpu').contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_suffix('.tmp')
    save_file(tensors, str(tmp), metadata={'format': 'pt'})
    os.replace(tmp, path)


def export_folder(
        model: nn.Module,
        out_dir: PathLike,
        model_args: Optional[Mapping[str, Any]] = None,
        metrics: Optional[Mapping[str, Any]] = None,
        recipe: Union[None, str, Path, Mapping[str, Any]] = None,
        repo_id: Optional[str] = None,
        tag: Optional[str] = None,
        license: Optional[str] = None,
        description: Optional[str] = None,
        data_config: Optional[Mapping[str, Any]] = None,
        label_names: Optional[Sequence[str]] = None,
        overwrite: bool = False,
) -> Path:
    """Write a Hub-ready folder for ``model``: model.safetensors, config.json, README.md.

    ``model_args`` adds or confirms constructor arguments (they are checked by rebuilding the
    model); ``metrics`` (e.g. ``dict(top1=.., top5=.., dataset=.., img_size=..)``) and ``recipe``
    (a train.py YAML path, its text or a dict) go into the model card; ``label_names`` (one per
    class, in classifier order) name the classes in config.json. Weights are never pickled.
    A folder that already holds any of those files is refused (FileExistsError, nothing
    written) unless ``overwrite``; other files in it are left alone.
    """
    model = _unwrap(model)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f'{out} is a file, not a folder')
    existing = [name for name in EXPORT_FILES if (out / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f'{out} already holds {", ".join(existing)}; nothing was written')
    config = hub_config(model, model_args, tag=tag, license=license, description=description,
                        data_config=data_config, label_names=label_names)
    out.mkdir(parents=True, exist_ok=True)
    _save_weights(model, out / WEIGHTS_NAME)
    (out / 'config.json').write_text(json.dumps(config, indent=2) + '\n')
    (out / 'README.md').write_text(model_card(config, model, repo_id, metrics, recipe))
    return out


def _folder_config(weights: Path) -> Dict[str, Any]:
    """What a DDW ``config.json`` next to a ``.safetensors`` file says about it (or nothing).

    It lets ``timm-ddw export FOLDER/model.safetensors NEW`` re-export a published folder, also one
    written in the layout before label_names (``num_classes`` inside ``model_args``).
    """
    path = weights.parent / 'config.json'
    if weights.suffix != '.safetensors' or not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    if not isinstance(config, dict) or config.get('architecture') not in TWINS:
        return {}
    args = dict(config.get('model_args') or {})
    if isinstance(config.get('num_classes'), int):
        args.setdefault('num_classes', config['num_classes'])
    names = config.get('label_names') or (config.get('pretrained_cfg') or {}).get('label_names')
    return dict(arch=config['architecture'], model_args=args, label_names=names)


def export_checkpoint(
        checkpoint: PathLike,
        out_dir: PathLike,
        model_name: Optional[str] = None,
        model_args: Optional[Mapping[str, Any]] = None,
        use_ema: bool = True,
        overwrite: bool = False,
        label_names: Optional[Sequence[str]] = None,
        **card: Any,
) -> Path:
    """Export a train.py checkpoint (EMA weights preferred, as timm does) with :func:`export_folder`.

    The model name defaults to the checkpoint's ``arch``; ``num_classes`` and ``in_chans``
    default to the shapes of its classifier and first conv. The weights must fit exactly.
    ``label_names`` default to those ``timm-ddw train`` stored in the checkpoint. A
    ``.safetensors`` file next to a DDW ``config.json`` (an exported folder, old layout or new)
    takes its architecture, arguments and class names from there.
    """
    from timm.models import get_pretrained_cfg

    from .loading import create_ddw_model, read_checkpoint

    path = Path(checkpoint)
    state_dict, meta = read_checkpoint(path, use_ema=use_ema)
    meta = {**_folder_config(path), **{k: v for k, v in meta.items() if v}}
    name = model_name or meta.get('arch')
    if name not in TWINS:
        raise ValueError(f"model {name!r} (given, or the checkpoint's arch) is not one of {sorted(TWINS)}")
    args = dict(meta.get('model_args') or {})
    args.update(model_args or {})
    cfg = get_pretrained_cfg(name)
    head, stem = f'{cfg.classifier}.weight', f'{cfg.first_conv}.weight'
    if head in state_dict and 'num_classes' not in args:
        args['num_classes'] = int(state_dict[head].shape[0])
    if stem in state_dict and 'in_chans' not in args:
        args['in_chans'] = int(state_dict[stem].shape[1])
    model = create_ddw_model(name, **args)
    load_checked(model, state_dict, source=str(path))
    if label_names is None:
        label_names = meta.get('label_names') or None
    return export_folder(model.eval(), out_dir, model_args=args, label_names=label_names, overwrite=overwrite,
                         **card)


def _check_folder(folder: Path) -> List[Path]:
    """The export files of ``folder``, checked: safetensors weights that open, a DDW config."""
    if not folder.is_dir():
        raise FileNotFoundError(f'{folder} is not a folder')
    pickles = [p.name for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ValueError(f'{folder} holds pickle files {pickles}; publish safetensors only (timm-ddw export)')
    for required in (WEIGHTS_NAME, 'config.json'):
        if not (folder / required).is_file():
            raise FileNotFoundError(f'{folder} has no {required}; create the folder with `timm-ddw export`')
    try:
        config = json.loads((folder / 'config.json').read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{folder / 'config.json'} is not JSON: {e}") from None
    if config.get('architecture') not in TWINS or 'model_args' not in config:
        raise ValueError(f"{folder / 'config.json'} is not a DDW model config (architecture="
                         f"{config.get('architecture')!r}, needs one of {sorted(TWINS)} and model_args)")
    from safetensors import safe_open
    try:
        with safe_open(str(folder / WEIGHTS_NAME), framework='pt') as f:
            if not list(f.keys()):
                raise ValueError(f'{folder / WEIGHTS_NAME} holds no tensors')
    except Exception as e:  # SafetensorError: truncated or not safetensors
        if isinstance(e, ValueError):
            raise
        raise DdwCheckpointError(f'{folder / WEIGHTS_NAME} is not a readable safetensors file: {e}') from None
    return [folder / name for name in EXPORT_FILES if (folder / name).is_file()]


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _is_network_error(e: BaseException) -> bool:
    if isinstance(e, OSError):  # includes huggingface_hub's OfflineModeIsEnabled
        return True
    return type(e).__module__.split('.')[0] in ('httpx', 'httpx2', 'httpcore', 'requests', 'urllib3')


def push_folder(
        folder: PathLike,
        repo_id: str,
        token: Optional[str] = None,
        private: bool = False,
        revision: Optional[str] = None,
        create_pr: bool = False,
        commit_message: str = 'Add DDW model (timm-ddw)',
        dry_run: bool = False,
) -> Dict[str, Any]:
    """Upload the export files of ``folder`` to the Hub model repo ``repo_id`` (created if missing).

    Only model.safetensors, config.json and README.md are uploaded; other files in the folder
    are listed as ``skipped``. The token is ``token`` or huggingface_hub's usual one
    (``HF_TOKEN``, ``hf auth login``); without one nothing is sent. ``dry_run`` checks the
    folder and returns the plan without any network call. A Hub that cannot be reached raises
    ConnectionError.
    """
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    files = _check_folder(folder)
    if repo_id.count('/') != 1 or not all(repo_id.split('/')):
        raise ValueError(f"repo_id={repo_id!r} must be 'ORG/NAME'")
    names = [p.name for p in files]
    skipped = sorted(str(p.relative_to(folder)) for p in folder.rglob('*')
                     if p.is_file() and p.name not in names and '.cache' not in p.parts)
    token = token or get_token()
    plan: Dict[str, Any] = dict(repo_id=repo_id, private=private, revision=revision, create_pr=create_pr,
                                files=names, skipped=skipped, token_found=bool(token))
    if dry_run:
        return plan
    if not token:
        raise PermissionError('no Hugging Face token: set HF_TOKEN or run `hf auth login`; nothing was uploaded')
    api = HfApi(token=token)
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type='model')
        commit = api.upload_folder(
            repo_id=repo.repo_id, folder_path=str(folder), repo_type='model', revision=revision,
            create_pr=create_pr, commit_message=commit_message, allow_patterns=names)
    except HfHubHTTPError as e:
        raise ConnectionError(f'the Hugging Face Hub refused the upload to {repo_id}: {_first_line(e)}') from None
    except Exception as e:
        if not _is_network_error(e):
            raise
        raise ConnectionError(f'could not reach the Hugging Face Hub at {constants.ENDPOINT} ({_first_line(e)}); '
                              'nothing was uploaded') from None
    plan['url'] = getattr(commit, 'commit_url', None) or str(commit)
    return plan


def write_hub_configs(out_dir: PathLike = 'hub_configs') -> List[Path]:
    """Write ``<out_dir>/<model>/config.json`` and ``README.md`` (card template) for all nine models."""
    import timm

    written = []
    for name in TWINS:
        model = timm.create_model(name, device='meta')
        config = hub_config(model)
        folder = Path(out_dir) / name
        folder.mkdir(parents=True, exist_ok=True)
        for fname, text in (('config.json', json.dumps(config, indent=2) + '\n'),
                            ('README.md', model_card(config, model))):
            (folder / fname).write_text(text)
            written.append(folder / fname)
    return written


def check_hub_configs(out_dir: PathLike = 'hub_configs') -> List[str]:
    """Files under ``out_dir`` that differ from freshly generated ones (empty when in sync)."""
    if not Path(out_dir).is_dir():
        raise FileNotFoundError(f'{out_dir} does not exist; generate it with `timm-ddw hub-configs {out_dir}`')
    with tempfile.TemporaryDirectory() as tmp:
        fresh = write_hub_configs(tmp)
        stale = []
        for path in fresh:
            rel = path.relative_to(tmp)
            committed = Path(out_dir) / rel
            if not committed.is_file() or committed.read_text() != path.read_text():
                stale.append(str(rel))
    return stale
