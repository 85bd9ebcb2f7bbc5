"""``edge-runtime repo init|add|keys|remove|publish|rotate|refresh-timestamp``: the publisher's TUF repository.

See :mod:`edge_runtime.fleet.repository` for the layout and the roles. A typical release::

    edge-runtime repo add repo/ cls-v4.bundle --targets-key targets.key
    edge-runtime repo publish repo/ --snapshot-key snapshot.key --timestamp-key timestamp.key
    # cron, every few hours (the timestamp expires after a day by default):
    edge-runtime repo refresh-timestamp repo/ --timestamp-key timestamp.key
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner

from edge_runtime.cli.common import Context, emit, verb_parser
from edge_runtime.fleet.repository import Expiry, Repository, signer_from_file

__all__ = ["register"]


def _expiry(args: argparse.Namespace) -> Expiry:
    days = {role: getattr(args, f"{role}_days", None) for role in ("root", "targets", "snapshot", "timestamp")}
    return Expiry(**{k: v for k, v in days.items() if v is not None})


def _signers(paths: list[Path]) -> list[CryptoSigner]:
    return [signer_from_file(p) for p in paths]


def _init(ctx: Context, args: argparse.Namespace) -> int:
    repo = Repository(args.dir)
    roles = {"root": _signers(args.root_key), "targets": _signers(args.targets_key),
             "snapshot": _signers([args.snapshot_key]), "timestamp": _signers([args.timestamp_key])}
    repo.init(roles, args.root_threshold or len(roles["root"]), _expiry(args))
    emit(ctx, {"repository": str(args.dir), "root_version": 1},
         f"TUF repository in {args.dir}: install {args.dir / 'metadata' / 'root.json'} as root.json in each "
         "device's trust dir")
    return 0


def _add(ctx: Context, args: argparse.Namespace) -> int:
    added = Repository(args.dir).add(args.bundle, _signers(args.targets_key), _expiry(args))
    emit(ctx, {"targets": added}, f"added {', '.join(added)}; run `repo publish` to make it visible")
    return 0


def _keys(ctx: Context, args: argparse.Namespace) -> int:
    path = Repository(args.dir).set_publisher_keys(args.publisher_key, args.threshold or len(args.publisher_key),
                                                   _signers(args.targets_key), _expiry(args))
    emit(ctx, {"target": path}, f"publisher keys set ({path}); run `repo publish`: devices adopt them and "
                                "drop the versions only revoked keys signed")
    return 0


def _remove(ctx: Context, args: argparse.Namespace) -> int:
    Repository(args.dir).remove(args.model, _signers(args.targets_key), _expiry(args))
    emit(ctx, {"removed": args.model}, f"removed {args.model}; run `repo publish` to make it visible")
    return 0


def _publish(ctx: Context, args: argparse.Namespace) -> int:
    repo = Repository(args.dir)
    repo.snapshot_and_timestamp(_signers([args.snapshot_key]), _signers([args.timestamp_key]), _expiry(args))
    emit(ctx, {"published": True}, "published a new snapshot and timestamp")
    return 0


def _refresh(ctx: Context, args: argparse.Namespace) -> int:
    version = Repository(args.dir).timestamp(_signers([args.timestamp_key]), _expiry(args))
    emit(ctx, {"timestamp_version": version}, f"timestamp v{version}")
    return 0


def _rotate(ctx: Context, args: argparse.Namespace) -> int:
    new = _signers(args.new_key)
    old_root = _signers(args.root_key)
    new_root = new if args.role == "root" else old_root
    version = Repository(args.dir).rotate(args.role, new, args.threshold or len(new), old_root, new_root,
                                          _expiry(args))
    emit(ctx, {"root_version": version, "role": args.role},
         f"root v{version}: {args.role} now has {len(new)} key(s); devices follow it at their next poll")
    return 0


def register(verbs: Any) -> None:
    """Add the ``repo`` verb and its sub-verbs."""
    repo = verbs.add_parser("repo", help="publish bundles in a TUF repository (a static directory)")
    sub = repo.add_subparsers(dest="repo_verb", metavar="SUBVERB", required=True)

    def parser(name: str, text: str, *roles: str) -> argparse.ArgumentParser:
        p = verb_parser(sub, name, text)
        p.add_argument("dir", type=Path, metavar="DIR", help="the repository directory")
        for role in roles:
            p.add_argument(f"--{role}-days", type=float, metavar="DAYS", help=f"{role} metadata expiry")
        return p

    p = parser("init", "create a repository: root v1 and empty targets, snapshot, timestamp",
               "root", "targets", "snapshot", "timestamp")
    p.add_argument("--root-key", type=Path, action="append", required=True, help="root key (repeat: k-of-n)")
    p.add_argument("--root-threshold", type=int, default=0, help="root signatures needed (default: all)")
    p.add_argument("--targets-key", type=Path, action="append", required=True, help="a publisher key")
    p.add_argument("--snapshot-key", type=Path, required=True)
    p.add_argument("--timestamp-key", type=Path, required=True)
    p.set_defaults(handler=_init)

    p = parser("add", "add (or replace) bundles as targets models/<name>.bundle", "targets")
    p.add_argument("bundle", type=Path, nargs="+", metavar="BUNDLE")
    p.add_argument("--targets-key", type=Path, action="append", required=True)
    p.set_defaults(handler=_add)

    p = parser("keys", "deliver the keys that sign bundle manifests (rotates them on every device)", "targets")
    p.add_argument("--publisher-key", type=Path, action="append", required=True, metavar="KEY.pub")
    p.add_argument("--threshold", type=int, default=0, help="manifest signatures needed (default: all keys)")
    p.add_argument("--targets-key", type=Path, action="append", required=True)
    p.set_defaults(handler=_keys)

    p = parser("remove", "remove a model's target", "targets")
    p.add_argument("model")
    p.add_argument("--targets-key", type=Path, action="append", required=True)
    p.set_defaults(handler=_remove)

    p = parser("publish", "sign a new snapshot and timestamp of the current targets", "snapshot", "timestamp")
    p.add_argument("--snapshot-key", type=Path, required=True)
    p.add_argument("--timestamp-key", type=Path, required=True)
    p.set_defaults(handler=_publish)

    p = parser("refresh-timestamp", "sign a new timestamp (run it from cron to keep devices fresh)", "timestamp")
    p.add_argument("--timestamp-key", type=Path, required=True)
    p.set_defaults(handler=_refresh)

    p = parser("rotate", "a new root version with new keys for one role (old keys revoked)", "root")
    p.add_argument("--role", required=True, choices=("root", "targets", "snapshot", "timestamp"))
    p.add_argument("--new-key", type=Path, action="append", required=True)
    p.add_argument("--threshold", type=int, default=0, help="signatures the role needs (default: all new keys)")
    p.add_argument("--root-key", type=Path, action="append", required=True,
                   help="the current root keys (a threshold of them signs the new root)")
    p.set_defaults(handler=_rotate)
