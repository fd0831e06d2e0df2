"""torchrun --nproc_per_node=2 (gloo, CPU) trains a DDW model as timm's train.py does (see ddp_worker.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name('ddp_worker.py')
ROOT = WORKER.parents[1]


def _run(out: Path, *extra: str) -> dict:
    pythonpath = os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=pythonpath)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(WORKER),
           '--out', str(out), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((out / 'result.json').read_text())


@pytest.fixture(scope='module')
def result(tmp_path_factory):
    return _run(tmp_path_factory.mktemp('ddp'))


@pytest.fixture(scope='module')
def budget_result(tmp_path_factory):
    return _run(tmp_path_factory.mktemp('ddp_budget'), '--node-budget', '0.5')


def test_ddp_configured_as_train_py(result):
    assert result['world_size'] == 2
    assert result['ddp_find_unused'] is False  # every DDW parameter gets a gradient each step
    assert result['ddp_broadcast_buffers'] is True
    assert result['num_bn_left'] == 0 and result['num_sync_bn_in_stages'] > 0  # conversion reaches the graph stages


def test_uneven_last_batch_and_loss_goes_down(result):
    sizes = [h['sizes'] for h in result['history']]
    assert all(s[-1] < s[0] for s in sizes), sizes
    first, last = (sum(h['losses']) / len(h['losses']) for h in (result['history'][0], result['history'][-1]))
    assert last < 0.5 * first, (first, last)


def test_ranks_hold_identical_weights(result):
    assert result['num_params'] > 1e6
    assert result['max_param_diff'] == 0.0
    assert result['max_buffer_diff'] == 0.0


def test_resume_gives_the_same_next_step(result):
    assert result['resume_epoch'] == 1
    assert result['resumed_next'] == pytest.approx(result['uninterrupted_next'], abs=1e-6)
    assert result['resumed_epoch'] == pytest.approx(result['uninterrupted_epoch'], abs=1e-5)


def test_ranks_stay_identical_with_a_node_budget(budget_result):
    """The controller averages the nodes' usage over ranks: without that, each rank would move its
    thresholds by its own data after the last forward, and the buffers would differ."""
    shifts = [v for stage in budget_result['budget_shifts'] for v in stage[:-1]]
    assert shifts and max(abs(v) for v in shifts) > 0.01, 'the controller moved the thresholds'
    assert budget_result['max_param_diff'] == 0.0
    assert budget_result['max_buffer_diff'] == 0.0


def test_resume_with_a_node_budget_gives_the_same_next_step(budget_result):
    # the thresholds' shifts are buffers: the checkpoint carries them
    assert budget_result['resumed_next'] == pytest.approx(budget_result['uninterrupted_next'], abs=1e-6)
    assert budget_result['resumed_epoch'] == pytest.approx(budget_result['uninterrupted_epoch'], abs=1e-5)
