"""``edge-runtime run`` (one-shot inference) and ``edge-runtime config check``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from edge_runtime._util.fsutil import CappedReadError, atomic_write, read_capped
from edge_runtime.cli.common import Context, emit, verb_parser
from edge_runtime.devtools.draw import drawable, mask_bytes, save_picture
from edge_runtime.errors import EdgeRuntimeError, InputError, UsageError
from edge_runtime.runtime.loaded_model import LoadedModel
from edge_runtime.runtime.preprocess import decode_image, is_npy

__all__ = ["register"]


def _pick_model(ctx: Context, name: str | None) -> str:
    if name:
        return name
    names = [n for n in ctx.store.cache.names() if ctx.store.cache.active_version(n) is not None]
    if len(names) != 1:
        listed = ", ".join(names) or "none"
        raise UsageError(f"{len(names)} models are active ({listed}); choose one with --model")
    return names[0]


def _out_path(template: Path, source: Path, several: bool) -> Path:
    """Where the picture/mask of ``source`` goes: ``{stem}`` in the template is the input's file stem."""
    if "{stem}" in str(template):
        return Path(str(template).replace("{stem}", source.stem))
    if several:
        raise UsageError(f"{template}: with several inputs, put {{stem}} in the file name (e.g. out/{{stem}}.jpg)")
    return template


def _save_outputs(model: LoadedModel, args: argparse.Namespace, path: Path, data: bytes, result: dict[str, Any],
                  record: dict[str, Any]) -> None:
    """``--draw`` and ``--save-mask`` for one input; the mask leaves the printed record (its file is named)."""
    several = len(args.inputs) > 1
    kind = model.manifest.postprocess.type
    if args.draw is not None:
        if not drawable(result):
            raise UsageError(f"model {model.name} gives no detections or segmentation to draw (postprocess.type "
                             f"is {kind!r})")
        if is_npy(data):
            raise InputError("a .npy tensor input has no picture to draw on")
        target = _out_path(args.draw, path, several)
        limits = model.limits
        image = decode_image(data, limits.max_image_bytes, limits.max_image_pixels, limits.max_decode_bytes)
        save_picture(target, image, result)
        record["picture"] = str(target)
    png = mask_bytes(result)
    result.get("segmentation", {}).pop("mask_png", None)
    if args.save_mask is not None:
        if png is None:
            raise UsageError(f"model {model.name} gives no segmentation mask to save (postprocess.type is {kind!r})")
        target = _out_path(args.save_mask, path, several)
        atomic_write(target, png)
        record["mask_file"] = str(target)


def _run(ctx: Context, args: argparse.Namespace) -> int:
    for template in (args.draw, args.save_mask):
        if template is not None and len(args.inputs) > 1 and "{stem}" not in str(template):
            raise UsageError(f"{template}: with several inputs, put {{stem}} in the file name (e.g. out/{{stem}}.jpg)")
    model = ctx.store.load(_pick_model(ctx, args.model), args.version)
    failures = 0
    try:
        for path in args.inputs:
            record: dict[str, Any] = {"input": str(path), "model": model.name, "version": model.version}
            try:
                data = read_capped(path, ctx.config.limits.max_image_bytes, follow_symlinks=True)
                prediction = model.predict_bytes(data, with_mask=args.save_mask is not None or args.draw is not None)
                if args.save_mask is not None or args.draw is not None:
                    _save_outputs(model, args, path, data, prediction.results[0], record)
            except CappedReadError as e:
                failures += 1
                record["error"] = f"input exceeds the {e.limit}-byte cap"
            except OSError as e:
                failures += 1
                record["error"] = f"cannot read input: {e.strerror}"
            except EdgeRuntimeError as e:
                failures += 1
                record["error"] = e.one_line()
            else:
                result = prediction.results[0] if len(prediction.results) == 1 else prediction.results
                record.update(result=result, latency_ms={k: round(v, 3) for k, v in prediction.timings_ms.items()})
            # One JSON object per line: results stream as they are computed.
            print(json.dumps(record, sort_keys=True), flush=True)
            if "error" in record:
                print(f"error: {path}: {record['error']}", file=sys.stderr)
    finally:
        model.close()
    return 1 if failures else 0


def _config_check(ctx: Context, args: argparse.Namespace) -> int:
    # The file as the verbs would read it, with --state-dir/--trust-dir (a conflicting state_dir is refused).
    config = Context(args.file, ctx.state_dir, ctx.trust_dir, ctx.json).config
    emit(ctx, {"ok": True, "state_dir": str(config.state_dir), "trust_dir": str(config.trust_dir)},
         f"{args.file}: OK")
    return 0


def register(verbs: Any) -> None:
    """Add ``run`` and ``config``."""
    p = verb_parser(verbs, "run", "one-shot inference on image (.jpg/.png) or .npy files; JSON lines out")
    p.add_argument("--model", default=None, help="model name (default: the only active model)")
    p.add_argument("--model-version", dest="version", type=int, default=None, metavar="N",
                   help="a cached version instead of the active one")
    p.add_argument("--draw", type=Path, default=None, metavar="OUT.jpg",
                   help="write the image with the boxes, labels and scores (or the mask) drawn; "
                        "{stem} in the name is each input's file stem")
    p.add_argument("--save-mask", type=Path, default=None, metavar="OUT.png",
                   help="write a segmentation model's class mask as PNG ({stem} as for --draw)")
    p.add_argument("inputs", type=Path, nargs="+", metavar="INPUT")
    p.set_defaults(handler=_run)

    config = verbs.add_parser("config", help="configuration tools")
    sub = config.add_subparsers(dest="config_verb", metavar="SUBVERB", required=True)
    p = verb_parser(sub, "check", "validate a config file (unknown keys and bad values are errors)")
    p.add_argument("file", type=Path, metavar="FILE")
    p.set_defaults(handler=_config_check)
