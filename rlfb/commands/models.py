"""``rlfb models``: list the built-in offline models, and rebuild them from their recipes.

    rlfb models list                      # the shipped copy of each built-in model and its cache entries
    rlfb models list --verify             # ... and recompute every entry's weights sha256
    rlfb models build rlfb-tiny           # rebuild it from its recipe into the cache, compare with the shipped copy
    rlfb models build rlfb-tiny --rebuild # build again even if the cache has an entry
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rlfb.errors import ModelNotFoundError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``list`` and ``build`` actions."""
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="show the shipped copy of each built-in model and its cache entries")
    listing.add_argument("--verify", action="store_true",
                         help="also recompute each entry's weights sha256 (file sizes are always checked)")
    build = actions.add_parser("build", help="rebuild a built-in model from its recipe into the cache, print "
                                             "its directory and whether it matches the shipped copy")
    build.add_argument("name", help="a built-in model name, e.g. rlfb-tiny")
    build.add_argument("--rebuild", action="store_true", help="build again even if a cached copy exists")
    build.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Runs ``rlfb models list`` or ``rlfb models build NAME``."""
    from rlfb.models import builtin
    from rlfb.models.loading import BUILTIN_MODELS

    if args.action == "list":
        for name, description in BUILTIN_MODELS.items():
            print(f"{name}: {description}")
            for line in _listing(name, verify=args.verify):
                print(f"  {line}")
        return 0

    if args.name not in BUILTIN_MODELS:
        raise ModelNotFoundError(
            f"unknown built-in model {args.name!r}; built-in models: {', '.join(sorted(BUILTIN_MODELS))} "
            "(hub ids and local directories need no build: name them in a config directly)")
    path = builtin.ensure_built(args.name, rebuild=args.rebuild, progress=not args.quiet)
    print(compare_with_shipped(args.name, path), file=sys.stderr)
    print(path)
    return 0


def compare_with_shipped(name: str, path: Path) -> str:
    """One sentence: whether the build in ``path`` has the weights of the shipped copy of ``name``."""
    from rlfb.models import builtin

    rebuilt = builtin.read_marker(path) or {}
    shipped = builtin.read_marker(builtin.shipped_path(name))
    use_it = f"to train on this build, name its directory as the model (`model: {path}`)"
    if shipped is None:
        return f"rlfb: there is no shipped copy of {name} to compare with; {use_it}"
    if shipped.get("recipe_hash") != rebuilt.get("recipe_hash"):
        return (f"rlfb: the shipped copy of {name} was built from another recipe, so the weights are not "
                f"comparable; {use_it}")
    if shipped.get("weights_sha256") == rebuilt.get("weights_sha256"):
        return (f"rlfb: the rebuild matches the shipped weights of {name} (sha256 "
                f"{_short(rebuilt.get('weights_sha256'))}): `model: {name}` is this same model")
    return (f"rlfb: the rebuild differs from the shipped weights of {name} (sha256 "
            f"{_short(rebuilt.get('weights_sha256'))}, torch {rebuilt.get('torch_version')}; shipped "
            f"{_short(shipped.get('weights_sha256'))}, torch {shipped.get('torch_version')}): float sums "
            f"round in another order on another CPU or torch version. `model: {name}` still loads the "
            f"shipped copy; {use_it}")


def _listing(name: str, *, verify: bool) -> list[str]:
    """The lines of ``rlfb models list`` for one built-in model."""
    from rlfb.models import builtin

    recipe = builtin.BUILTIN_RECIPES[name]
    shipped = builtin.shipped_path(name)
    shipped_record = builtin.read_marker(shipped)
    if shipped_record is None:
        lines = [f"shipped  none in {shipped}"]
    else:
        problem = builtin.verify_entry(shipped, check_weights=verify)
        lines = [f"shipped  {shipped}  {_state(shipped, shipped_record, problem)}"]
    loads_shipped = shipped_record is not None and shipped_record.get("recipe_hash") == recipe.fingerprint()
    current = builtin.cache_path(name, recipe)
    lines.append(f"`{name}` loads {'the shipped copy' if loads_shipped else current}")
    lines.append(f"cache    {builtin.rlfb_home() / 'models'} (set RLFB_HOME to move it)")
    entries = builtin.cache_entries(name)
    for entry in entries:
        record = builtin.read_marker(entry) or {}
        problem = builtin.verify_entry(entry, check_weights=verify)
        if problem is not None:
            fix = f"`rlfb models build {name}` rebuilds it" if entry == current else "delete it"
            lines.append(f"  {entry.name}  damaged: {problem}; {fix}")
        elif record.get("recipe_hash") != recipe.fingerprint():
            lines.append(f"  {entry.name}  from another recipe (not used; delete it to free the space)")
        else:
            same = shipped_record is not None and record.get("weights_sha256") == shipped_record.get("weights_sha256")
            comparison = "same weights as the shipped copy" if same else "other weights than the shipped copy"
            lines.append(f"  {entry.name}  {_state(entry, record, None)}, {comparison}")
    if not entries:
        lines.append(f"  no rebuilds (`rlfb models build {name}` builds one into {current})")
    return lines


def _state(path: Path, record: dict[str, Any], problem: str | None) -> str:
    from rlfb.models import builtin

    if problem is not None:
        return f"damaged: {problem}"
    return (f"ok ({builtin.directory_size(path) / 1e6:.1f} MB, weights sha256 "
            f"{_short(record.get('weights_sha256'))}, torch {record.get('torch_version')})")


def _short(digest: object) -> str:
    return f"{str(digest)[:16]}..."
