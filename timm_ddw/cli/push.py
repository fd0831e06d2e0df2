"""``timm-ddw push``: upload an exported folder to the Hugging Face Hub (:func:`timm_ddw.hub.push_folder`)."""
from __future__ import annotations

import argparse
from typing import Any

from ..hub import push_folder
from ._common import HelpFormatter

__all__ = ['add_parser']


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        'push', help='upload an exported folder to the Hugging Face Hub',
        description='Upload the files `timm-ddw export` writes (model.safetensors, config.json, README.md) to a Hub '
                    'model repository, created if missing; other files in the folder are not uploaded. The token '
                    'is huggingface_hub\'s (HF_TOKEN, or `hf auth login`).', formatter_class=HelpFormatter)
    p.add_argument('folder', help='a folder written by timm-ddw export')
    p.add_argument('repo_id', help='ORG/NAME (created if missing)')
    p.add_argument('--private', action='store_true', help='create the repository private')
    p.add_argument('--revision', default=None, help='branch to push to (default: main)')
    p.add_argument('--create-pr', action='store_true', help='open a pull request instead of committing')
    p.add_argument('--commit-message', default='Add DDW model (timm-ddw)', help='commit message')
    p.add_argument('--dry-run', action='store_true', help='check the folder and print the plan; no network')
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    plan = push_folder(args.folder, args.repo_id, private=args.private, revision=args.revision,
                       create_pr=args.create_pr, commit_message=args.commit_message, dry_run=args.dry_run)
    skipped = f"; not uploaded: {', '.join(plan['skipped'])}" if plan['skipped'] else ''
    if args.dry_run:
        print(f"dry run: would upload {', '.join(plan['files'])} from {args.folder} to "
              f"https://huggingface.co/{plan['repo_id']} (private={plan['private']}){skipped}; "
              f"token {'found' if plan['token_found'] else 'NOT found (set HF_TOKEN or run `hf auth login`)'}")
    else:
        print(f"uploaded {', '.join(plan['files'])} to https://huggingface.co/{plan['repo_id']}: {plan['url']}"
              f"{skipped}")
    return 0
