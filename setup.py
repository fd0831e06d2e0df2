"""Build step that pyproject.toml cannot express: install ``timm_ddw-hook.pth`` into site-packages.

Everything else is configured in pyproject.toml. The .pth file runs ``_timm_ddw_hook.install()``
at interpreter start (see that module); it is written into the wheel's root (regular installs)
and into the editable wheel (``pip install -e .``).
"""
import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

_spec = importlib.util.spec_from_file_location('_timm_ddw_hook', Path(__file__).parent / '_timm_ddw_hook.py')
_hook = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_hook)


class BuildPyWithHook(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, 'editable_mode', False):
            # PEP 660: setuptools' editable_wheel packs its install_lib (the unpacked editable
            # wheel) verbatim, while build_lib is thrown away
            target = Path(self.get_finalized_command('install').install_lib)
        else:
            target = Path(self.build_lib)
        target.mkdir(parents=True, exist_ok=True)
        (target / _hook.PTH_NAME).write_text(_hook.PTH_LINE)
        self._pth_output = str(target / _hook.PTH_NAME)

    def get_outputs(self, *args, **kwargs):
        outputs = super().get_outputs(*args, **kwargs)
        pth = getattr(self, '_pth_output', None)
        return outputs + [pth] if pth and not getattr(self, 'editable_mode', False) else outputs


setup(cmdclass={'build_py': BuildPyWithHook})
