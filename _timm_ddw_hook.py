"""Post-import hook: import ``timm_ddw`` right after ``timm``, so unmodified timm scripts see the ddw models.

The package installs ``timm_ddw-hook.pth`` next to itself in site-packages; the interpreter runs its
one line at start-up, which calls :func:`install`. That only puts a small finder on
``sys.meta_path`` (no torch, no timm import at start-up). When something later imports ``timm``,
the finder lets timm import as usual and then imports ``timm_ddw``, which registers the models.
If ``timm_ddw`` fails to import, ``import timm`` still succeeds (with a warning).

Set ``TIMM_DDW_NO_HOOK=1`` to turn the hook off. This module must stay importable without torch.
"""
import os
import sys

ENV_VAR = 'TIMM_DDW_NO_HOOK'
PTH_NAME = 'timm_ddw-hook.pth'
# the .pth line the build writes; site.py executes lines starting with 'import'
PTH_LINE = (
    "import os; os.environ.get('TIMM_DDW_NO_HOOK', '').strip().lower() in ('', '0', 'false', 'no') "
    "and __import__('_timm_ddw_hook').install()\n"
)


def disabled() -> bool:
    return os.environ.get(ENV_VAR, '').strip().lower() not in ('', '0', 'false', 'no')


def _import_ddw() -> None:
    if disabled() or 'timm_ddw' in sys.modules:
        return
    try:
        import timm_ddw  # noqa: F401
    except Exception as e:  # never break `import timm`
        import warnings
        warnings.warn(
            f'timm_ddw post-import hook: importing timm_ddw failed ({type(e).__name__}: {e}); '
            f'the ddw_* models are not registered. Set {ENV_VAR}=1 to silence this.', RuntimeWarning, stacklevel=2)


class _Loader:
    """Runs timm's own loader, then imports timm_ddw."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        # hand timm its real loader back before running it, so nothing later sees this wrapper
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        _import_ddw()


class TimmFinder:
    """A ``sys.meta_path`` finder that only reacts to the top-level ``timm`` import, once."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != 'timm':
            return None
        uninstall()  # one shot; also keeps the lookup below from recursing into this finder
        if disabled():
            return None
        for finder in sys.meta_path:
            find_spec = getattr(finder, 'find_spec', None)
            if find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, 'exec_module'):
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


def install() -> None:
    """Put the finder first on ``sys.meta_path`` unless timm is already imported or the hook is off."""
    try:
        if disabled() or 'timm' in sys.modules or any(isinstance(f, TimmFinder) for f in sys.meta_path):
            return
        sys.meta_path.insert(0, TimmFinder())
    except Exception:  # a start-up hook must never stop the interpreter
        pass


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, TimmFinder)]
