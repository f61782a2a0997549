"""The real-photo check: photos that installed packages ship, labelled by eye, each ranked against one free vocabulary.

Builds a photo-check folder (``photos.csv`` and ``vocabulary.txt``; the images copied in) from
darknet's sample photos (Debian package ``darknet``) and scikit-image's sample photos (PyPI
``scikit-image``). Nothing of them is committed: they are read from the installed packages. With
``--splits``, it also trains every method on each split (the benchmark harness) and prints how
each ranks the photos: how many photos have a correct best label, and the mean per-image AP.
`clip-decoder bench --photos DIR` puts the same table into docs/RESULTS.md.
Run: python -m bench.photos [--out data/photos] [--splits JSON ...] [--seeds 0 1 2] [--methods ...]
"""

from __future__ import annotations

import shutil
import sys
from importlib import resources
from pathlib import Path

from bench.report import bench_parser, check_inputs
from clip_decoder.benchmark import PHOTOS_PART, VOCABULARY_FILE, photos_table, run_benchmark
from clip_decoder.data.folder import write_part
from clip_decoder.training.methods import method_names

DARKNET = Path("/usr/share/darknet/data")
# (package, file) -> its labels, by eye. The vocabulary adds labels no photo has.
PHOTOS: dict[tuple[str, str], tuple[str, ...]] = {
    ("darknet", "dog.jpg"): ("dog", "bicycle", "truck", "tree"),
    ("darknet", "giraffe.jpg"): ("giraffe", "zebra", "tree", "grass"),
    ("darknet", "person.jpg"): ("person", "dog", "horse"),
    ("darknet", "kite.jpg"): ("kite", "person", "beach", "water"),
    ("darknet", "horses.jpg"): ("horse", "mountain"),
    ("darknet", "eagle.jpg"): ("eagle", "bird", "water"),
    ("scikit-image", "chelsea.png"): ("cat",),
    ("scikit-image", "coffee.png"): ("cup", "coffee", "saucer", "spoon"),
    ("scikit-image", "astronaut.png"): ("person", "astronaut", "flag", "space shuttle", "helmet"),
    ("scikit-image", "rocket.jpg"): ("rocket",),
    ("scikit-image", "motorcycle_left.png"): ("motorcycle",),
}
VOCABULARY = ("dog", "cat", "horse", "giraffe", "zebra", "bird", "eagle", "person", "astronaut", "bicycle", "motorcycle",
              "car", "truck", "kite", "rocket", "space shuttle", "flag", "helmet", "cup", "coffee", "saucer", "spoon",
              "tree", "grass", "mountain", "beach", "water", "pizza", "guitar")


def source(package: str, name: str) -> Path:
    """Where an installed package keeps the photo ``name``; exits with the install command if it is missing."""
    if package == "darknet":
        path, install = DARKNET / name, "apt-get install darknet (or `make system-packages`)"
    else:
        try:
            path = Path(str(resources.files("skimage") / "data" / name))
        except ModuleNotFoundError:
            path = Path("/nonexistent") / name
        install = "pip install scikit-image (the [dev] extra has it)"
    if not path.is_file():
        sys.exit(f"error: no {path}: {install}")
    return path


def build(out: Path) -> Path:
    """Copy the photos into ``out/images`` and write ``out/photos.csv`` and ``out/vocabulary.txt``."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for (package, name), labels in PHOTOS.items():
        target = out / "images" / f"{package}-{name}"
        shutil.copyfile(source(package, name), target)
        rows.append((target.relative_to(out).as_posix(), labels))
    write_part(out, PHOTOS_PART, rows)
    (out / VOCABULARY_FILE).write_text("\n".join(VOCABULARY) + "\n", encoding="utf-8")
    return out


def main() -> None:
    parser = bench_parser(__doc__, target="nothing (it prints)")  # --data, --no-write
    parser.add_argument("--out", type=Path, default=Path("data/photos"), help="the photo-check folder to write")
    parser.add_argument("--splits", type=Path, nargs="*", default=[], metavar="JSON",
                        help="also train each method on these label splits and rank the photos")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=method_names(), default=list(method_names()))
    args = parser.parse_args()
    print(f"photo check written to {build(args.out)} ({len(PHOTOS)} photos, {len(VOCABULARY)} labels)")
    if not args.splits:
        return
    check_inputs(args.data, part="train")
    results = run_benchmark(args.data, args.splits, tuple(args.seeds), tuple(args.methods), photos=args.out)
    for name, per_method in results.items():
        print(f"\n### Photos, models trained on split `{name}`\n\n{photos_table(per_method)}")


if __name__ == "__main__":
    main()
