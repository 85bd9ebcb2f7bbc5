"""Oracle child: rapidocr's text detector (its DetPreProcess and DBPostProcess threshold).

Usage: rapidocr_det_mask.py MODEL OUT_DIR IMAGE... ; for each image saves the package's segmentation
bitmap (``pred > thresh``, before its optional dilation) as STEM_mask.npy and the tensor it fed as
STEM_in.npy; prints one JSON line {image stem: {"input_hw": [h, w], "thresh": t}}.
"""

import json
import sys
from pathlib import Path

import cv2
import numpy as np
from rapidocr_onnxruntime.ch_ppocr_det.utils import DBPostProcess, DetPreProcess
from rapidocr_onnxruntime.utils import OrtInferSession


def main() -> None:
    model, out_dir = sys.argv[1], Path(sys.argv[2])
    # The package's own defaults (rapidocr_onnxruntime/config.yaml, Det).
    session = OrtInferSession({"model_path": model, "use_cuda": False, "use_dml": False,
                               "intra_op_num_threads": -1, "inter_op_num_threads": -1})
    post = DBPostProcess(thresh=0.3, box_thresh=0.5, max_candidates=1000, unclip_ratio=1.6, use_dilation=True)
    report = {}
    for name in sys.argv[3:]:
        image = cv2.imread(name)
        tensor = DetPreProcess(736, "min", [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])(image)
        pred = session(tensor)[0]
        mask = pred[:, 0, :, :] > post.thresh
        stem = Path(name).stem
        np.save(out_dir / f"{stem}_in.npy", tensor)
        np.save(out_dir / f"{stem}_mask.npy", mask[0])
        boxes, _ = post(pred, image.shape[:2])
        report[stem] = {"input_hw": list(tensor.shape[2:]), "thresh": post.thresh, "text_boxes": len(boxes)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
