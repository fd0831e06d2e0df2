"""The post-import hook and ``python -m timm_ddw.run``: unmodified scripts that import timm see the ddw models."""
import importlib.metadata
import os
import site
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

import _timm_ddw_hook as hook

ROOT = Path(__file__).resolve().parents[1]

# what site.py does with the installed .pth file at start-up, on a directory we control
SITE = """
import site, sys
site.addsitedir({dir!r})
print('after-startup', 'torch' in sys.modules, 'timm' in sys.modules,
      any(type(f).__name__ == 'TimmFinder' for f in sys.meta_path))
"""
USE_TIMM = """
import sys, timm
print('ddw-models', len(timm.list_models('ddw_*')), 'timm_ddw' in sys.modules, type(timm.__spec__.loader).__name__)
"""


def _python(code, tmp_path, env=None, pythonpath=(ROOT,)):
    env = {k: v for k, v in os.environ.items() if k != hook.ENV_VAR} | dict(env or {})
    env['PYTHONPATH'] = os.pathsep.join(str(p) for p in pythonpath)
    proc = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _site(tmp_path):
    site_dir = tmp_path / 'site'
    site_dir.mkdir()
    (site_dir / hook.PTH_NAME).write_text(hook.PTH_LINE)
    return site_dir


def test_pth_installs_finder_only_then_timm_import_registers_models(tmp_path):
    out = _python(SITE.format(dir=str(_site(tmp_path))) + USE_TIMM, tmp_path).stdout.split()
    # start-up imports neither torch nor timm, only places the finder
    assert out[:4] == ['after-startup', 'False', 'False', 'True']
    assert out[4] == 'ddw-models' and int(out[5]) == 9 and out[6] == 'True'
    assert out[7] != '_Loader'  # timm keeps its own loader


def test_env_var_turns_hook_off(tmp_path):
    out = _python(SITE.format(dir=str(_site(tmp_path))) + USE_TIMM, tmp_path, env={hook.ENV_VAR: '1'}).stdout.split()
    assert out[:4] == ['after-startup', 'False', 'False', 'False']
    assert out[4:7] == ['ddw-models', '0', 'False']


def test_broken_timm_ddw_never_breaks_import_timm(tmp_path):
    fake = tmp_path / 'fake'
    (fake / 'timm_ddw').mkdir(parents=True)
    (fake / 'timm_ddw' / '__init__.py').write_text('raise ImportError("simulated breakage")\n')
    proc = _python(SITE.format(dir=str(_site(tmp_path))) + USE_TIMM, tmp_path, pythonpath=(fake, ROOT))
    out = proc.stdout.split()
    assert out[4:7] == ['ddw-models', '0', 'False']
    assert 'simulated breakage' in proc.stderr and hook.ENV_VAR in proc.stderr


def _installed_pth():
    """The hook's .pth in this interpreter's site-packages, if the installed package has it."""
    dirs = set(site.getsitepackages()) | {sysconfig.get_paths()['purelib']}
    for d in dirs:
        if (Path(d) / hook.PTH_NAME).is_file():
            return Path(d) / hook.PTH_NAME
    return None


def test_installed_hook_in_a_fresh_interpreter(tmp_path):
    """The real thing: the installed package's .pth, and a script that only imports timm."""
    pth = _installed_pth()
    if pth is None:
        pytest.skip('the installed timm-ddw has no hook .pth (installed before the hook existed); '
                    'reinstall with pip install -e .')
    assert pth.read_text() == hook.PTH_LINE
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', hook.ENV_VAR)}
    code = "import sys, timm; print(len(timm.list_models('ddw_*')), 'timm_ddw' in sys.modules)"
    run = [sys.executable, '-c', code]
    assert subprocess.run(run, cwd=tmp_path, env=env, capture_output=True, text=True).stdout.split() == ['9', 'True']
    off = subprocess.run(run, cwd=tmp_path, env=env | {hook.ENV_VAR: '1'}, capture_output=True, text=True)
    assert off.stdout.split() == ['0', 'False']


def test_wheel_installs_pth_and_hook_module(tmp_path):
    """setup.py's build step puts the .pth at the wheel's root (site-packages after install)."""
    try:
        setuptools_version = tuple(int(x) for x in importlib.metadata.version('setuptools').split('.')[:2])
    except importlib.metadata.PackageNotFoundError:
        pytest.skip('setuptools not installed')
    if setuptools_version < (77, 0):
        pytest.skip('building needs setuptools >= 77 (PEP 639 license field)')
    src = tmp_path / 'src'
    src.mkdir()
    for name in ('pyproject.toml', 'setup.py', '_timm_ddw_hook.py', 'README.md'):
        (src / name).write_bytes((ROOT / name).read_bytes())
    (src / 'timm_ddw').mkdir()
    for f in (ROOT / 'timm_ddw').rglob('*.py'):
        dest = src / f.relative_to(ROOT)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(f.read_bytes())
    proc = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '--no-build-isolation',
                           '-w', str(tmp_path / 'dist'), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / 'dist').glob('timm_ddw-*.whl')
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert hook.PTH_NAME in names and '_timm_ddw_hook.py' in names and 'timm_ddw/run.py' in names
        assert z.read(hook.PTH_NAME).decode() == hook.PTH_LINE
        record = z.read(next(n for n in names if n.endswith('.dist-info/RECORD'))).decode()
        assert hook.PTH_NAME in record  # pip uninstall removes it


def test_hook_module_does_not_import_torch(tmp_path):
    out = _python('import sys, _timm_ddw_hook; print("torch" in sys.modules, "timm" in sys.modules)', tmp_path)
    assert out.stdout.split() == ['False', 'False']


def test_run_module_registers_models_for_a_script(tmp_path):
    script = tmp_path / 'script.py'
    script.write_text(textwrap.dedent('''
        import sys, timm
        print(__name__, sys.argv[1:], 'ddw_resnet50' in timm.list_models('ddw_*'))
    '''))
    env = {hook.ENV_VAR: '1'}  # no hook: the runner alone must register the models
    out = _python(f'import sys, runpy; sys.argv = ["run", {str(script)!r}, "--model", "x"]; '
                  'runpy.run_module("timm_ddw.run", run_name="__main__")', tmp_path, env=env)
    assert out.stdout.split() == ['__main__', "['--model',", "'x']", 'True']


def test_run_module_bad_script(capsys):
    from timm_ddw.run import main
    assert main(['missing.py']) == 2
    assert "SCRIPT 'missing.py' is not a file" in capsys.readouterr().err
    assert main([]) == 2
