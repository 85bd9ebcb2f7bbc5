"""``bundle pack --reference DIR``: the drift reference, measured with the bundle's own model.

The bundle is first packed without a reference and read back the way a device
reads it (signatures, hashes, the same :class:`LoadedModel`), so the
reference comes from exactly the preprocessing, runtime and postprocessing
the device will run; then every input of DIR goes through it and
:func:`~edge_runtime.bundle.reference_stats.build_reference` turns the
features into ``reference.json``, which the final pack signs like any file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_runtime._util.fsutil import CappedReadError, read_capped
from edge_runtime.bundle.reader import read_bundle
from edge_runtime.bundle.reference_stats import MIN_SAMPLES, Baseline, build_reference, parse_reference
from edge_runtime.bundle.signing import key_id
from edge_runtime.bundle.writer import GOLDEN_INPUT_SUFFIXES, BundleSpec, pack_bundle
from edge_runtime.config.model import Limits
from edge_runtime.errors import InputError, ManifestError
from edge_runtime.runtime.backends.base import BackendOptions
from edge_runtime.runtime.loaded_model import LoadedModel
from edge_runtime.runtime.monitor_features import CATEGORICAL

__all__ = ["MAX_REFERENCE_INPUTS", "check_reference_file", "measure_reference", "reference_inputs"]

MAX_REFERENCE_INPUTS = 20_000


def reference_inputs(directory: Path) -> list[Path]:
    """The images and .npy files of ``directory``, by name (hidden files skipped).

    Raises:
        InputError: unreadable, fewer than the minimum or more than the maximum inputs.
    """
    try:
        found = sorted(p for p in directory.iterdir() if not p.name.startswith(".")
                       and p.suffix.lower() in GOLDEN_INPUT_SUFFIXES and p.is_file())
    except OSError as e:
        raise InputError(f"cannot read reference dir {directory}: {e.strerror or e}") from e
    if not MIN_SAMPLES <= len(found) <= MAX_REFERENCE_INPUTS:
        raise InputError(f"reference dir {directory} has {len(found)} inputs; a reference needs "
                         f"{MIN_SAMPLES} to {MAX_REFERENCE_INPUTS} ({', '.join(GOLDEN_INPUT_SUFFIXES)})")
    return found


def measure_reference(spec: BundleSpec, keys: Sequence[Ed25519PrivateKey], directory: Path, baseline: Baseline,
                      limits: Limits, work: Path) -> Path:
    """Write ``work/reference.json`` measured on the inputs of ``directory``; returns its path.

    Raises:
        InputError: the directory has too few inputs, or one is unreadable or not an image/tensor.
        BundleError / ModelError: the draft bundle does not pack or its model does not run.
    """
    inputs = reference_inputs(directory)
    draft = work / "draft.bundle"
    pack_bundle(draft, dataclasses.replace(spec, reference=None), keys)
    publics = [k.public_key() for k in keys]
    trusted = {key_id(p): p for p in publics}
    stage = work / "stage"
    stage.mkdir(mode=0o700)
    staged = read_bundle(draft, trusted=trusted, threshold=len(trusted), limits=limits, staging_root=stage)
    model = LoadedModel(staged.manifest, staged.directory, options=BackendOptions(), limits=limits)
    rows = []
    try:
        for path in inputs:
            try:
                data = read_capped(path, limits.max_image_bytes, follow_symlinks=True)
            except (CappedReadError, OSError) as e:
                raise InputError(f"reference input {path}: unreadable or over {limits.max_image_bytes} bytes") from e
            try:
                prediction = model.predict_bytes(data)
            except InputError as e:
                raise InputError(f"reference input {path.name}: {e.one_line()}") from e
            assert prediction.tensor is not None
            rows.append(model.features.as_dict(prediction.tensor, prediction.outputs, prediction.results[0]))
    finally:
        model.close()
    out = work / "reference.json"
    out.write_bytes(build_reference(rows, CATEGORICAL, baseline).to_json())
    return out


def check_reference_file(path: Path) -> None:
    """A ready-made ``reference = "FILE.json"`` of the spec must parse as a device will parse it.

    Raises:
        ManifestError: unreadable or not a valid reference.
    """
    if path.suffix.lower() != ".json":
        return
    try:
        parse_reference(read_capped(path, 256 << 10, follow_symlinks=True))
    except CappedReadError as e:
        raise ManifestError(f"reference file {path} is over {e.limit} bytes") from e
    except OSError as e:
        raise ManifestError(f"reference file {path}: cannot read: {e.strerror or e}") from e
