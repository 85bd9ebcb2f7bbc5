"""``edge-runtime models install|list|activate|rollback|verify``: the device cache."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from edge_runtime.cache.pins import pin_refusal
from edge_runtime.cli.common import Context, emit, verb_parser
from edge_runtime.errors import CacheError, EdgeRuntimeError, SignatureError, UsageError
from edge_runtime.runtime.gates import GateReport
from edge_runtime.telemetry.events import EventBus
from edge_runtime.update.ota import OtaUpdater

__all__ = ["register"]


def _gate_text(report: GateReport | None) -> str:
    if report is None:
        return "gates skipped"
    parts = [f"golden {report.golden_passed}/{report.golden_total}"]
    if report.latency is not None:
        parts.append(f"latency p95 {report.latency.p95:.2f} ms")
    return ", ".join(parts)


def _gate_json(report: GateReport | None) -> dict[str, Any] | None:
    return None if report is None else dataclasses.asdict(report)


def _install(ctx: Context, args: argparse.Namespace) -> int:
    if (args.bundle is None) == (args.from_repo is None):
        raise UsageError("give a BUNDLE or --from-repo DIR (one of them)")
    if args.from_repo is not None:
        return _install_from_repo(ctx, args)
    if args.model:
        raise UsageError("--model goes with --from-repo")
    result = ctx.store.install(args.bundle, activate=not args.no_activate, gates=not args.no_gates,
                               force=args.force)
    m = result.manifest
    state = "active" if result.active else "installed, not active"
    emit(ctx, {"name": m.name, "version": m.version, "active": result.active, "gates": _gate_json(result.gates)},
         f"installed {m.name} v{m.version} ({state}; {_gate_text(result.gates)})")
    return 0


def _install_from_repo(ctx: Context, args: argparse.Namespace) -> int:
    """A copied TUF repository (USB, air-gapped): the same verification as OTA, from the device's trusted root."""
    if args.no_activate or args.no_gates or args.force:
        raise UsageError("--from-repo installs as OTA does: gated and activated (no --no-activate/--no-gates/--force)")
    ota = dataclasses.replace(ctx.config.ota, repository_url=str(args.from_repo.resolve()),
                              models=tuple(args.model))
    events = EventBus(ctx.store.config.state_dir / "events.jsonl")
    results = OtaUpdater(ota, ctx.store, None, events).poll_repository(raise_failures=True)
    emit(ctx, [dataclasses.asdict(r) for r in results],
         "\n".join(f"installed {r.name} v{r.version} from {args.from_repo} ({'active' if r.active else 'not active'})"
                   for r in results) or f"nothing newer in {args.from_repo}")
    return 0


def _list(ctx: Context, args: argparse.Namespace) -> int:
    models = ctx.store.cache.list_models()
    lines = [f"{'NAME':24} {'ACTIVE':>6} {'PREVIOUS':>8} {'FLOOR':>5}  VERSIONS"]
    for m in models:
        flags = f"  pinned={m.pinned}" if m.pinned is not None else ""
        flags += f"  problems: {'; '.join(m.problems)}" if m.problems else ""
        lines.append(f"{m.name:24} {m.active or '-':>6} {m.previous or '-':>8} {m.floor:>5}  "
                     f"{','.join(map(str, m.versions)) or '-'}{flags}")
    emit(ctx, [dataclasses.asdict(m) for m in models], "\n".join(lines) if models else "no models installed")
    return 0


def _activate(ctx: Context, args: argparse.Namespace) -> int:
    if (refused := pin_refusal(ctx.store.cache, args.name, args.version)) is not None:
        raise CacheError(refused)  # the same precedence as the MQTT commands: the pin wins
    report = ctx.store.activate(args.name, args.version, gates=not args.no_gates, force=args.force)
    emit(ctx, {"name": args.name, "active": args.version, "gates": _gate_json(report)},
         f"{args.name} v{args.version} is active ({_gate_text(report)})")
    return 0


def _rollback(ctx: Context, args: argparse.Namespace) -> int:
    if (refused := pin_refusal(ctx.store.cache, args.name, args.to)) is not None:
        raise CacheError(refused)  # the same precedence as the MQTT commands: the pin wins
    version = ctx.store.cache.rollback(args.name, args.to)
    emit(ctx, {"name": args.name, "active": version}, f"{args.name} rolled back to v{version}")
    return 0


def _verify_line(name: str, version: int, error: EdgeRuntimeError | None) -> str:
    if error is None:
        return f"{name} v{version}: ok"
    # A version signed by a key no longer trusted is not corrupt, but it is not served either.
    label = "UNTRUSTED" if isinstance(error, SignatureError) else "CORRUPT"
    return f"{name} v{version}: {label}: {error.one_line()}"


def _verify(ctx: Context, args: argparse.Namespace) -> int:
    results = ctx.store.cache.verify_all()
    rows = [{"name": n, "version": v, "ok": e is None, "error": e.one_line() if e else None} for n, v, e in results]
    emit(ctx, rows, "\n".join(_verify_line(*r) for r in results) or "no models installed")
    return 1 if any(e is not None for _, _, e in results) else 0


def register(verbs: Any) -> None:
    """Add the ``models`` verb and its sub-verbs."""
    models = verbs.add_parser("models", help="manage the device's model cache")
    sub = models.add_subparsers(dest="models_verb", metavar="SUBVERB", required=True)

    p = verb_parser(sub, "install", "verify a bundle, gate it on this device, install and activate it")
    p.add_argument("bundle", type=Path, metavar="BUNDLE", nargs="?")
    p.add_argument("--from-repo", type=Path, metavar="DIR",
                   help="a copied TUF repository (USB, air-gapped): install what it offers, verified as OTA is")
    p.add_argument("--model", action="append", default=[], metavar="NAME",
                   help="with --from-repo: also a model not in the cache yet (repeat)")
    p.add_argument("--no-activate", action="store_true", help="install into the cache only")
    p.add_argument("--no-gates", action="store_true", help="skip loading and golden/latency gates")
    p.add_argument("--force", action="store_true", help="try a version whose gate failed before")
    p.set_defaults(handler=_install)

    p = verb_parser(sub, "list", "list cached models, versions, active/previous and floors")
    p.set_defaults(handler=_list)

    p = verb_parser(sub, "activate", "make a cached version active (loaded and gated first)")
    p.add_argument("name")
    p.add_argument("version", type=int)
    p.add_argument("--no-gates", action="store_true", help="skip golden/latency gates")
    p.add_argument("--force", action="store_true", help="try a version whose gate failed before")
    p.set_defaults(handler=_activate)

    p = verb_parser(sub, "rollback", "go back to the previous version (or --to a cached one)")
    p.add_argument("name")
    p.add_argument("--to", type=int, default=None, metavar="VERSION")
    p.set_defaults(handler=_rollback)

    p = verb_parser(sub, "verify", "re-check every cached version: manifest signature with the keys "
                                   "trusted now, file list, every hash")
    p.set_defaults(handler=_verify)
