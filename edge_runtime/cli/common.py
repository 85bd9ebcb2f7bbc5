"""What every CLI verb shares: common options, the loaded config, output."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_runtime.config.model import DEFAULT_CONFIG_PATH, Config, load_config
from edge_runtime.config.typed_toml import load_toml
from edge_runtime.errors import ConfigError, EdgeRuntimeError
from edge_runtime.update.state_recovery import recover_state
from edge_runtime.update.store import ModelStore

__all__ = ["Context", "add_common_options", "emit", "report_errors", "verb_parser"]


def add_common_options(parser: argparse.ArgumentParser, *, top_level: bool = False) -> None:
    """--config/--state-dir/--trust-dir/--json/-v, accepted before or after the verb.

    On verb parsers the defaults are SUPPRESS so they do not clobber values
    given before the verb.
    """
    default: Any = None if top_level else argparse.SUPPRESS
    flag_default: Any = False if top_level else argparse.SUPPRESS
    group = parser.add_argument_group("common options")
    group.add_argument("--config", type=Path, default=default, metavar="PATH",
                       help="config file (default: /etc/edge-runtime/config.toml when present)")
    group.add_argument("--state-dir", type=Path, default=default, metavar="DIR",
                       help="override state_dir (model cache, state file)")
    group.add_argument("--trust-dir", type=Path, default=default, metavar="DIR",
                       help="override trust_dir (trusted publisher *.pub keys)")
    group.add_argument("--json", action="store_true", default=flag_default, help="machine-readable output")
    group.add_argument("-v", "--verbose", action="store_true", default=flag_default, help="debug logging")


def verb_parser(verbs: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    """A verb sub-parser that also takes the common options."""
    parser: argparse.ArgumentParser = verbs.add_parser(name, help=help_text, description=help_text)
    add_common_options(parser)
    return parser


@dataclass
class Context:
    """Parsed common options; the config and model store are built on first use."""

    config_path: Path | None
    state_dir: Path | None
    trust_dir: Path | None
    json: bool
    _config: Config | None = field(default=None, repr=False)
    _store: ModelStore | None = field(default=None, repr=False)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Context:
        return cls(args.config, args.state_dir, args.trust_dir, bool(args.json))

    @property
    def config(self) -> Config:
        """The config with CLI overrides applied. Raises ConfigError."""
        if self._config is None:
            config = load_config(self.config_path)
            if self.state_dir is not None:
                _refuse_two_state_dirs(self.config_path, config, self.state_dir.resolve())
                config = config.replace(state_dir=self.state_dir.resolve())
            if self.trust_dir is not None:
                config = config.replace(trust_dir=self.trust_dir.resolve())
            self._config = config
        return self._config

    @property
    def store(self) -> ModelStore:
        """The model store over the configured state dir, its state file recovered and staging swept.

        Raises CacheError: the state dir is unusable.
        """
        if self._store is None:
            store = ModelStore(self.config)
            # The daemon does both at its start; a CLI command must not wait for one (issue 9 §6).
            recovery = recover_state(store.cache, store.trusted_keys, store.threshold())
            if recovery is not None:
                print(f"warning: {recovery.one_line()}", file=sys.stderr)
            store.cache.sweep_staging()
            self._store = store
        return self._store


def _refuse_two_state_dirs(config_path: Path | None, config: Config, override: Path) -> None:
    """A config file that names another state_dir than --state-dir is refused, not silently overridden:
    the daemon (the systemd unit passes --state-dir) and a CLI run without the flag would use different caches.

    Raises:
        ConfigError: the file sets ``state_dir`` to a directory other than ``override``.
    """
    path = config_path or (DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None)
    if path is None or config.state_dir.resolve() == override or "state_dir" not in load_toml(path):
        return
    raise ConfigError(f"--state-dir {override} conflicts with state_dir = \"{config.state_dir}\" in {path}: "
                      "set the state dir in one place (the systemd unit passes --state-dir $STATE_DIRECTORY)")


def report_errors(run: Callable[[], int]) -> int:
    """Run ``run``; turn our errors and OS errors into one ``error: ...`` line and exit code 1
    (130 on Ctrl-C). Shared by the CLI and the publisher tools under tools/."""
    try:
        return run()
    except EdgeRuntimeError as e:
        print(f"error: {e.one_line()}", file=sys.stderr)
        return 1
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def emit(ctx: Context, data: Any, text: str) -> None:
    """Print ``data`` as JSON with --json, else the human ``text``."""
    if ctx.json:
        json.dump(data, sys.stdout, indent=1, sort_keys=True, default=str)
        sys.stdout.write("\n")
    else:
        print(text)
