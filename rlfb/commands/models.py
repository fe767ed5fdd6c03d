"""``rlfb models``: build and list the built-in offline models.

    rlfb models list                      # built-in models, whether they are cached, where, and how big
    rlfb models build rlfb-tiny           # build (or find) rlfb-tiny and print its directory
    rlfb models build rlfb-tiny --rebuild # build again, replacing the cache entry
"""

from __future__ import annotations

import argparse

from rlfb.errors import ModelNotFoundError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``list`` and ``build`` actions."""
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("list", help="show the built-in models and their cache state")
    build = actions.add_parser("build", help="build a built-in model (if not cached) and print its directory")
    build.add_argument("name", help="a built-in model name, e.g. rlfb-tiny")
    build.add_argument("--rebuild", action="store_true", help="build again even if a cached copy exists")
    build.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Runs ``rlfb models list`` or ``rlfb models build NAME``."""
    from rlfb.models import builtin
    from rlfb.models.loading import BUILTIN_MODELS

    if args.action == "list":
        print(f"model cache: {builtin.rlfb_home() / 'models'} (set RLFB_HOME to move it)")
        for name, description in BUILTIN_MODELS.items():
            path = builtin.cache_path(name, builtin.BUILTIN_RECIPES[name])
            if builtin.is_complete(path, builtin.BUILTIN_RECIPES[name]):
                state = f"cached  {path}  ({builtin.directory_size(path) / 1e6:.1f} MB)"
            else:
                state = f"not built  (run `rlfb models build {name}`; it will go to {path})"
            print(f"{name}: {description}\n  {state}")
        return 0

    if args.name not in BUILTIN_MODELS:
        raise ModelNotFoundError(
            f"unknown built-in model {args.name!r}; built-in models: {', '.join(sorted(BUILTIN_MODELS))} "
            "(hub ids and local directories need no build: name them in a config directly)")
    path = builtin.ensure_built(args.name, rebuild=args.rebuild, progress=not args.quiet)
    print(path)
    return 0
