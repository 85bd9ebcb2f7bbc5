"""The ``edge-runtime`` command line: one entry point, one verb per job.

Every verb takes ``--config PATH``, ``--state-dir DIR`` and ``--trust-dir DIR``
(before or after the verb). Errors print one line on stderr and exit non-zero:
1 for a refused operation, 2 for bad usage, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from edge_runtime import __version__
from edge_runtime.cli import bundle_cmd, fleet_cmd, models_cmd, repo_cmd, run_cmd, serve_cmd, tools_cmd
from edge_runtime.cli.common import Context, add_common_options, report_errors

__all__ = ["build_parser", "main"]

_VERB_MODULES = (bundle_cmd, fleet_cmd, models_cmd, repo_cmd, run_cmd, serve_cmd, tools_cmd)


def build_parser() -> argparse.ArgumentParser:
    """The full argparse tree (also used by tests to check every verb exists)."""
    parser = argparse.ArgumentParser(
        prog="edge-runtime",
        description="Edge inference daemon and tools: signed model bundles, model cache, serving.",
    )
    parser.add_argument("--version", action="version", version=f"edge-runtime {__version__}")
    add_common_options(parser, top_level=True)
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for module in _VERB_MODULES:
        module.register(verbs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return report_errors(lambda: int(args.handler(Context.from_args(args), args)))

