"""What every ``timm-ddw`` command shares: one-line errors, KEY=VALUE flags, defaults in ``--help``."""
from __future__ import annotations

import argparse
import ast
from typing import Any, Dict, Optional

__all__ = ['HelpFormatter', 'KeyValue', 'Parser', 'add_flag']

NO_DEFAULT = argparse.SUPPRESS


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) naming the command."""

    def error(self, message: str) -> None:
        self.exit(2, f'{self.prog}: error: {message} (see {self.prog} -h)\n')


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` for flags with a value; on/off flags and texts that give it are left as they are."""

    def _get_help_string(self, action: argparse.Action) -> Optional[str]:
        text = action.help or ''
        if action.default in (None, NO_DEFAULT, False) or 'default:' in text or action.nargs == 0:
            return text
        return super()._get_help_string(action)


class KeyValue(argparse.Action):
    """``KEY=VALUE ...`` into a dict, values read as Python literals (as timm's ParseKwargs does)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        kwargs: Dict[str, Any] = dict(getattr(namespace, self.dest, None) or {})
        for item in values:
            key, sep, value = item.partition('=')
            if not sep or not key.isidentifier():
                parser.error(f'{option_string} {item!r}: expected KEY=VALUE, e.g. wiring=static')
            try:
                kwargs[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                kwargs[key] = value  # a plain word: no quoting needed on the command line
        setattr(namespace, self.dest, kwargs)


def add_flag(group: Any, *flags: str, default: Any, help: str, **kwargs: Any) -> argparse.Action:
    """A flag whose default lives elsewhere (a dataclass): left out of the namespace unless given,
    its default shown in ``--help``."""
    shown = 'none' if default is None else default
    text = help if isinstance(default, bool) or 'default:' in help else f'{help} (default: {shown})'
    return group.add_argument(*flags, default=NO_DEFAULT, help=text, **kwargs)
