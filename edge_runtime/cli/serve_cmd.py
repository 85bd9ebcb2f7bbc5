"""``edge-runtime serve`` (the daemon) and ``edge-runtime demo``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from edge_runtime.cli.common import Context, verb_parser

__all__ = ["register"]


def _serve(ctx: Context, args: argparse.Namespace) -> int:
    from edge_runtime._util.log_limit import install
    from edge_runtime.daemon import Daemon  # the daemon's imports are only paid by the verbs that run it

    if not args.verbose:
        logging.getLogger().setLevel(logging.INFO)
    install()  # a flood (of commands, of frames, of broker errors) logs a few lines and a count, not millions
    config = ctx.config
    return Daemon(config).run()


def _demo(ctx: Context, args: argparse.Namespace) -> int:
    from edge_runtime.devtools.demo import run_demo

    return run_demo(args.dir, api_listen=args.listen, exit_after=args.exit_after, pictures=args.pictures)


def register(verbs: Any) -> None:
    """Add ``serve`` and ``demo``."""
    p = verb_parser(verbs, "serve", "run the daemon: sources, local API, OTA, MQTT (SIGTERM/Ctrl-C stop)")
    p.set_defaults(handler=_serve)

    p = verb_parser(verbs, "demo", "fetch a real model, sign, install and serve it from a folder (no broker)")
    p.add_argument("--dir", type=Path, default=None, help="demo dir (default ~/.local/share/edge-runtime/demo)")
    p.add_argument("--listen", default="127.0.0.1:8321", help="API address (default %(default)s)")
    p.add_argument("--exit-after", type=int, default=None, metavar="N", help="stop after N results")
    p.add_argument("--pictures", type=Path, default=None, metavar="DIR",
                   help="also draw every result (boxes, scores, keypoints) into DIR as STEM.jpg")
    p.set_defaults(handler=_demo)
