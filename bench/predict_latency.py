"""Default backbone on CPU: model load time, and predict time per image against the bare tower.

Baseline (same run): the image tower's forward pass on already preprocessed tensors. The
ratio predict / tower shows what decoding, preprocessing, label embedding and the head add.
Run: python bench/predict_latency.py [--images 32] [--labels 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, median_seconds, write_section  # noqa: E402

from clip_decoder import CLIPDecoder  # noqa: E402
from clip_decoder.images import load_image  # noqa: E402

PHOTO = Path(__file__).resolve().parent.parent / "tests" / "data" / "chelsea-cat.jpg"
VOCABULARY = ["cat", "dog", "car", "tree", "person", "bicycle", "sky", "house", "flower", "boat",
              "bird", "horse", "chair", "road", "mountain", "beach", "book", "clock", "train", "cup"]



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--labels", type=int, default=10, choices=range(1, len(VOCABULARY) + 1), metavar="N")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    start = time.perf_counter()
    model = CLIPDecoder.create(backbone="offline")
    create_s = time.perf_counter() - start
    with torch.inference_mode():
        folder = model.save_pretrained(Path("/tmp") / "clip-decoder-bench-model")
    load_s = median_seconds(lambda: CLIPDecoder.from_pretrained(folder), args.repeats)

    paths = [PHOTO] * args.images
    labels = VOCABULARY[: args.labels]
    model.predict(paths[:2], labels)  # warm-up; the labels are now embedded (cached)
    predict_s = median_seconds(lambda: model.predict(paths, labels, batch_size=args.batch_size), args.repeats)

    pixels = model.image_tower.preprocess.batch([load_image(PHOTO)] * args.batch_size)

    def bare_tower() -> None:
        with torch.inference_mode():
            for _ in range(0, args.images, args.batch_size):
                model.image_tower(pixels)

    tower_s = median_seconds(bare_tower, args.repeats)
    per_image_ms = 1000 * predict_s / args.images
    tower_ms = 1000 * tower_s / args.images
    table = "\n".join([
        "## Predict latency, default `offline` backbone (CPU)",
        "",
        f"Command: `python bench/predict_latency.py --images {args.images} --labels {args.labels}"
        f" --batch-size {args.batch_size} --repeats {args.repeats}`; {machine()}; medians of {args.repeats}.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| `CLIPDecoder.create('offline')` (first load in the process: includes importing transformers) | {create_s:.2f} s |",
        f"| `CLIPDecoder.from_pretrained(dir)` | {load_s:.2f} s |",
        f"| `predict`, per image ({args.labels} labels, batch {args.batch_size}, JPEG decode included) | {per_image_ms:.1f} ms |",
        f"| baseline: bare image-tower forward on preprocessed tensors, per image | {tower_ms:.1f} ms |",
        f"| ratio predict / bare tower | {predict_s / tower_s:.2f}x |",
    ])
    print(table)
    write_section("predict_latency", table)


if __name__ == "__main__":
    main()
