"""Oracle child: nudenet's own pipeline (its padding, cv2.dnn blob, its YOLOv8 decoder and NMS).

Usage: nudenet_boxes.py MODEL OUT_DIR IMAGE... ; prints one JSON line {image stem: {...}} with the
detections in source pixels (nudenet's x, y, w, h turned into corners) and saves the exact input tensor
it fed as STEM_in.npy.
"""

import json
import sys
from pathlib import Path

import numpy as np
from nudenet import nudenet as nn


def main() -> None:
    model, out_dir = sys.argv[1], Path(sys.argv[2])
    detector = nn.NudeDetector(model_path=model)
    labels = nn.__labels  # type: ignore[attr-defined]
    report = {}
    for name in sys.argv[3:]:
        blob, *_ = nn._read_image(name, detector.input_width)
        np.save(out_dir / f"{Path(name).stem}_in.npy", blob.astype(np.float32))
        items = []
        for d in detector.detect(name):
            x, y, w, h = d["box"]
            items.append({"box": [x, y, x + w, y + h], "score": d["score"], "class": labels.index(d["class"]),
                          "label": d["class"]})
        report[Path(name).stem] = {"detections": items}
    print(json.dumps({"labels": list(labels), "images": report}))


if __name__ == "__main__":
    main()
