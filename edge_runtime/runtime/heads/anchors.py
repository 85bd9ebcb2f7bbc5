"""SSD anchors, generated once per model as MediaPipe's ``SsdAnchorsCalculator`` does."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edge_runtime.bundle.postprocess_spec import Anchors, ssd_anchor_scale

__all__ = ["generate_anchors"]


def generate_anchors(spec: Anchors, input_hw: tuple[int, int]) -> NDArray[Any]:
    """``[A, 4]`` float32 anchors (x_centre, y_centre, width, height), normalised to the input.

    Anchors are ordered layer by layer, then row, column and anchor within a
    cell, which is the order SSD heads emit their boxes in.
    """
    height, width = spec.input_size or input_hw
    strides = spec.strides
    blocks: list[NDArray[Any]] = []
    layer = 0
    while layer < len(strides):
        sizes: list[tuple[float, float]] = []  # (width, height) of each anchor of a cell
        last = layer
        while last < len(strides) and strides[last] == strides[layer]:
            scale = ssd_anchor_scale(spec, last)
            if last == 0 and spec.reduce_boxes_in_lowest_layer:
                pairs = [(1.0, 0.1), (2.0, scale), (0.5, scale)]
            else:
                pairs = [(ratio, scale) for ratio in spec.aspect_ratios]
                if spec.interpolated_scale_aspect_ratio > 0:
                    following = 1.0 if last == len(strides) - 1 else ssd_anchor_scale(spec, last + 1)
                    pairs.append((spec.interpolated_scale_aspect_ratio, math.sqrt(scale * following)))
            sizes += [(s * math.sqrt(r), s / math.sqrt(r)) for r, s in pairs]
            last += 1
        stride = strides[layer]
        rows, cols = math.ceil(height / stride), math.ceil(width / stride)
        ys, xs = np.meshgrid((np.arange(rows) + spec.offset_y) / rows, (np.arange(cols) + spec.offset_x) / cols,
                             indexing="ij")
        per_cell = len(sizes)
        block = np.empty((rows, cols, per_cell, 4), np.float32)
        block[..., 0] = xs[..., None]
        block[..., 1] = ys[..., None]
        if spec.fixed_anchor_size:
            block[..., 2:] = 1.0
        else:
            block[..., 2] = np.array([w for w, _ in sizes], np.float32)
            block[..., 3] = np.array([h for _, h in sizes], np.float32)
        blocks.append(block.reshape(-1, 4))
        layer = last
    return np.concatenate(blocks) if blocks else np.zeros((0, 4), np.float32)
