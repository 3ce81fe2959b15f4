"""The ``casaspawner`` command line.

Bad input never shows a traceback. Every user-caused problem prints one line on stderr and exits
2, including a path the system refuses.

Subcommands owned by other wings (``pod``, ``images``, ``envs``) live in their own modules, listed
in ``PLUGINS``. Each provides ``register(subparsers)`` and sets ``func`` on its parser.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from casaspawner import __version__
from casaspawner.catalog.model import Catalog, load_catalog
from casaspawner.datasets.archive import AlmaDataLinkClient
from casaspawner.datasets.resolve import resolve_target
from casaspawner.datasets.synth import ERAS, write_dataset
from casaspawner.errors import CasaspawnerError, VersionUnknown, printable, shown
from casaspawner.kube import runs as kube_runs
from casaspawner.plan import PlanConfig, image_for

#: Modules adding subcommands. Each has ``register(subparsers) -> None``.
PLUGINS: tuple[str, ...] = (
    "casaspawner.kube.dryrun",
    "casaspawner.images",
    "casaspawner.local.environments.cli",
    "casaspawner.local.headless",
)


class Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line on stderr, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}\n")


def seconds(text: str) -> float:
    """A command-line duration: a finite number of seconds above zero, at most a day."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(
            f"{shown(text)!r} is not a time in seconds: give a number above 0, at most 86400"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="casaspawner", description="Start the CASA build ALMA's pipeline used on a dataset."
    )
    parser.add_argument("--version", action="version", version=f"casaspawner {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, parser_class=Parser, metavar="COMMAND"
    )

    p = sub.add_parser("catalog", help="print the ALMA pipeline / CASA release catalog")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--catalog", metavar="FILE", help="use this catalog file instead of the bundled one"
    )
    p.set_defaults(func=cmd_catalog)

    p = sub.add_parser(
        "resolve", help="tell which CASA build a dataset (directory or ALMA id) runs with"
    )
    p.add_argument(
        "target", metavar="TARGET", help="a dataset directory, an ALMA uid or a project code"
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--error-json",
        action="store_true",
        help=(
            "on failure, also print {error, kind} on stdout "
            "(for programs; the sentence stays on stderr)"
        ),
    )
    p.add_argument(
        "--catalog", metavar="FILE", help="use this catalog file instead of the bundled one"
    )
    p.add_argument(
        "--archive-url",
        default=os.environ.get("CASASPAWNER_ARCHIVE_URL", "https://almascience.org"),
        help=(
            "ALMA archive mirror used for identifiers "
            "(default: %(default)s; env CASASPAWNER_ARCHIVE_URL)"
        ),
    )
    p.add_argument(
        "--timeout",
        type=seconds,
        default=10.0,
        help="how long the archive may take, in all, in seconds (default: %(default)s)",
    )
    p.add_argument(
        "--registry",
        default=os.environ.get("CASASPAWNER_IMAGE_REGISTRY", PlanConfig().image_registry),
        help=(
            "image registry used to name the image "
            "(default: %(default)s; env CASASPAWNER_IMAGE_REGISTRY)"
        ),
    )
    p.set_defaults(func=cmd_resolve)

    p = sub.add_parser(
        "demo-data", help="write synthetic ALMA product trees (for trying things out)"
    )
    p.add_argument("directory", type=Path, help="where to write the trees")
    p.add_argument(
        "--era", action="append", choices=sorted(ERAS), help="which era (repeatable; default: all)"
    )
    p.set_defaults(func=cmd_demo_data)

    for module in PLUGINS:
        importlib.import_module(module).register(sub)
    # casaspawner run on Kubernetes (kube/runs.py), on the parser of one machine's run.
    run = sub.choices["run"]
    kube_runs.add_arguments(run)
    run.set_defaults(func=_run(run.get_default("func")))
    return parser


def _run(here: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``casaspawner run``: as a Kubernetes Job with ``--kubernetes``, else on this machine."""

    def run(args: argparse.Namespace) -> int:
        return kube_runs.cmd_run_kube(args) if args.kubernetes else here(args)

    return run


def _catalog(args: argparse.Namespace) -> Catalog:
    return load_catalog(args.catalog) if getattr(args, "catalog", None) else load_catalog()


def cmd_catalog(args: argparse.Namespace) -> int:
    catalog = _catalog(args)
    if args.json:
        print(json.dumps([release.summary_row() for release in catalog.releases], indent=2))
        return 0
    header = (
        "ID",
        "CASA",
        "PIPELINE",
        "USE (CYCLES)",
        "ALMA OPERATIONS",
        "PACKAGING",
        "CONFIDENCE",
    )
    table = [header] + [
        (
            release.id,
            release.casa,
            release.pipeline or "-",
            release.uses,
            release.ops_period or "-",
            release.packaging + (f" → {release.restore_with}" if release.restore_with else ""),
            release.confidence,
        )
        for release in catalog.releases
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        )
    return 0


def cmd_resolve(args: argparse.Namespace) -> int:
    catalog = _catalog(args)
    archive = AlmaDataLinkClient(args.archive_url, timeout=args.timeout)
    try:
        resolution = resolve_target(args.target, catalog, archive=archive)
    except CasaspawnerError as exc:
        # The sentence goes on stderr as always. A program, or a hub, also learns what kind it is.
        if args.error_json:
            print(json.dumps(error_json(exc), indent=2))
        raise
    image = image_for(resolution.release, PlanConfig(image_registry=args.registry))
    if args.json:
        print(json.dumps(resolution.to_json(image), indent=2))
        return 0
    evidence = resolution.evidence
    print(f"dataset:        {printable(resolution.dataset)}")
    print(
        f"processed with: CASA {evidence.casa}"
        + (f", pipeline {evidence.pipeline}" if evidence.pipeline else "")
    )
    print(f"evidence:       {evidence.kind} ({printable(evidence.path)})")
    print(
        f"session runs:   {resolution.release.label} [{resolution.release.id}]"
        + ("" if resolution.exact else " (not exact)")
    )
    print(f"image:          {image}")
    print(f"reason:         {resolution.reason}")
    return 0


def error_json(exc: CasaspawnerError) -> dict[str, str]:
    """Return what ``resolve --error-json`` prints on stdout when it fails.

    The command then exits with status 2. The JSON holds the sentence and the kind of failure.
    When the dataset tells no usable CASA version (``VersionUnknown``), it also holds the finding
    and the advice apart.
    """
    found: dict[str, str] = {"error": str(exc), "kind": type(exc).__name__}
    if isinstance(exc, VersionUnknown):
        found.update(finding=exc.finding, advice=exc.advice)
    return found


def cmd_demo_data(args: argparse.Namespace) -> int:
    for era in args.era or sorted(ERAS):
        member = write_dataset(args.directory / era, era)
        print(member)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except CasaspawnerError as exc:
        print(f"casaspawner: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except OSError as exc:
        # A path given on the command line that cannot be used: still one line, no traceback.
        where = f"{shown(str(exc.filename))}: " if exc.filename else ""
        print(f"casaspawner: {where}{exc.strerror or exc}.", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
