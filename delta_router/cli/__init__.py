"""``delta-router`` command line: a thin layer over the Python API.

Every command prints a rich table, or JSON with ``--json``. Errors on bad input print one
``error:`` line and exit with status 2, without a traceback.
"""

from __future__ import annotations

import os

# The CLI loads nothing from a model hub unless the user opts in (HF_HUB_OFFLINE=0), and shows its own
# progress bars, not one per weight file loaded. Set before the imports below: huggingface_hub and
# transformers read these once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from importlib.metadata import version  # noqa: E402

from delta_router.cli import data, experiments, models, routing, tasks  # noqa: E402
from delta_router.errors import DeltaRouterError  # noqa: E402
from delta_router.home import home  # noqa: E402

COMMAND_GROUPS = (models, data, tasks, routing, experiments)  # the order of `delta-router --help`


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="delta-router", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('delta-router')}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output")
    # -v also after the subcommand; SUPPRESS keeps a -v given before it
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log details")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.add_commands(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        logging.getLogger(__name__).info("cache home: %s", home())
        code = args.func(args)
    except (DeltaRouterError, ValueError, OSError) as exc:
        logging.getLogger(__name__).debug("traceback", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
