"""The train.py --config recipes: valid train.py keys, the paper's settings, in sync with their generator."""
from pathlib import Path

import pytest
import timm
import yaml

import timm_ddw  # noqa: F401
from timm_ddw.recipes import PROCESSES, RECIPE_DIR, RECIPES, TOTAL_BATCH, recipe_yaml, write_recipes

# argument names (argparse dests) of timm's train.py, huggingface/pytorch-image-models @ aa4b5850
TRAIN_PY_ARGS = frozenset("""
aa amp amp_dtype aug_repeats aug_splits batch_size bce_loss bce_pos_weight bce_sum bce_target_thresh bn_eps
bn_momentum channels_last checkpoint_hist class_map clip_grad clip_mode color_jitter color_jitter_prob
cooldown_epochs crop_pct cutmix cutmix_minmax data_dir dataset dataset_download decay_epochs decay_milestones
decay_rate device device_modules dist_bn drop drop_block drop_connect drop_path epoch_repeats epochs eval_metric
experiment fast_norm fuser gaussian_blur_prob gp grad_accum_steps grad_checkpointing grayscale_prob hflip img_size
in_chans initial_checkpoint input_img_mode input_size interpolation jsd_loss layer_decay local_rank log_interval
log_wandb lr lr_base lr_base_scale lr_base_size lr_cycle_decay lr_cycle_limit lr_cycle_mul lr_k_decay lr_noise
lr_noise_pct lr_noise_std mean min_lr mixup mixup_mode mixup_off_epoch mixup_prob mixup_switch_prob model
model_dtype model_ema model_ema_decay model_ema_force_cpu model_ema_warmup model_kwargs momentum no_aug no_ddp_bb
no_prefetcher no_resume_opt num_classes opt opt_betas opt_eps opt_kwargs output patience_epochs pin_mem pretrained
pretrained_path ratio recount recovery_interval remode reprob resplit resume save_images scale sched
sched_on_updates seed smoothing split_bn start_epoch std sync_bn synchronize_step torchcompile torchscript
train_crop_mode train_interpolation train_split tta use_multi_epochs_loader val_split validation_batch_size vflip
warmup_epochs warmup_lr warmup_prefix weight_decay worker_seeding workers
""".split())

FILES = sorted(RECIPE_DIR.glob('*.yaml'))


def test_one_recipe_per_model():
    assert sorted(RECIPES) == sorted(timm.list_models('ddw_*'))
    assert sorted(p.stem for p in FILES) == sorted(RECIPES)


@pytest.mark.parametrize('path', FILES, ids=[p.stem for p in FILES])
def test_recipe(path: Path):
    text = path.read_text()
    assert text == recipe_yaml(path.stem), f'{path} is stale: run python -m timm_ddw.recipes'
    cfg = yaml.safe_load(text)
    unknown = set(cfg) - TRAIN_PY_ARGS
    assert not unknown, f'not train.py arguments: {unknown}'
    assert cfg['model'] == path.stem and timm.is_model(cfg['model'])
    assert cfg['device_modules'] == ['timm_ddw']
    # the paper's settings
    assert cfg['opt'] == 'momentum' and cfg['momentum'] == 0.9
    assert cfg['batch_size'] * PROCESSES == TOTAL_BATCH == 1024
    assert cfg['img_size'] == 224
    assert isinstance(cfg['lr'], float) and cfg['lr'] > 0 and isinstance(cfg['epochs'], int)
    # every project choice and paper value is annotated
    for line in text.splitlines():
        if line and not line.startswith('#') and line.split(':')[0] not in ('model', 'cutmix', 'pin_mem'):
            assert '  # ' in line, line


def test_generator_writes_the_files(tmp_path):
    paths = write_recipes(tmp_path)
    assert [p.read_text() for p in paths] == [(RECIPE_DIR / p.name).read_text() for p in paths]
    with pytest.raises(ValueError, match='has no recipe'):
        recipe_yaml('resnet50')
