"""Real photos that installed packages ship, labelled by eye, each ranked against one free vocabulary.

Two sets, never mixed (and each again against a fixed vocabulary):
- ``check`` (``data/photos``): the photo check the results report (11 photos from darknet and
  scikit-image).
- ``dev`` (``data/photos-dev``): 40 other photos (scikit-learn, matplotlib, scikit-image, and Debian's
  plasma-workspace-wallpapers, opencv-doc and mate-backgrounds: `make photos-dev` installs them),
  used with nested label splits to choose how the zero-shot prior enters and how models decide
  (bench/prior_grid.py, bench/tune.py --photos); the check set is never used to choose.
- ``check-nus81`` and ``dev-nus81``: the same two sets, each photo labelled with NUS-WIDE's 81
  concepts and ranking exactly those 81 (a fixed vocabulary, as a user of that benchmark's labels
  would; some photos have none of them). The same rule holds: dev to choose, check to report.

Each set becomes a folder with ``photos.csv`` and ``vocabulary.txt`` and the images copied in.
Nothing of the photos is committed: they are read from the installed packages (licences below).
With ``--splits``, it also trains every method on each split (the benchmark harness) and prints how
each ranks the photos: how many photos have a correct best label, and the mean per-image AP. With
``--model``, it prints the same for one trained model (the packaged one by name), and its decisions:
the model's default rule, 0.5 everywhere and each photo's 3 best labels (benchmark.decisions).
`clip-decoder bench --photos DIR` puts the same table into docs/RESULTS.md.
Run: python -m bench.photos [--set check|dev|check-nus81|dev-nus81] [--out DIR] [--splits JSON ...] [--seeds 0 1 2] [--methods ...]
     [--model NAME_OR_DIR]
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from bench.report import bench_parser, check_inputs
from clip_decoder.benchmark import PHOTOS_PART, VOCABULARY_FILE, PhotoCheck, photos_table, run_benchmark
from clip_decoder.data.folder import write_part
from clip_decoder.features.cache import FeatureCache
from clip_decoder.model import CLIPDecoder
from clip_decoder.training.methods import method_names

# Where each source keeps its photos, and how to install it. Licences: darknet's sample photos ship
# with darknet (Debian's copyright file); scikit-image's are CC0, public domain or "no known
# copyright restrictions" (each in skimage.data's docstrings); scikit-learn's are CC-BY 2.0 (the
# README beside them); matplotlib's Grace Hopper portrait is a US Navy photo (public domain); the
# Plasma and MATE wallpapers are GPL-2+, OpenCV's sample data Apache-2.0 or BSD-3 (Debian's copyright files).
SOURCES: dict[str, tuple[str, str]] = {
    "darknet": ("/usr/share/darknet/data", "apt-get install darknet (or `make system-packages`)"),
    "scikit-image": ("skimage:data", "pip install scikit-image (the [dev] extra has it)"),
    "scikit-learn": ("sklearn:datasets/images", "pip install scikit-learn (the [dev] extra has it)"),
    "matplotlib": ("matplotlib:mpl-data/sample_data", "pip install matplotlib"),
    "plasma": ("/usr/share/wallpapers", "apt-get install plasma-workspace-wallpapers (or `make photo-packages`)"),
    "opencv": ("/usr/share/doc/opencv-doc/examples/data", "apt-get install opencv-doc (or `make photo-packages`)"),
    "mate": ("/usr/share/backgrounds/mate/nature", "apt-get install mate-backgrounds (or `make photo-packages`)"),
}


@dataclass(frozen=True)
class PhotoSet:
    """Photos ((source, file) -> their labels, by eye) and the vocabulary each photo ranks: their
    labels plus labels no photo has, or, with ``closed``, exactly ``distractors`` (a fixed vocabulary
    such as NUS-WIDE's 81 concepts, which every photo label must be in; a photo may have none)."""

    photos: dict[tuple[str, str], tuple[str, ...]]
    distractors: tuple[str, ...]
    closed: bool = False

    def __post_init__(self) -> None:
        outside = {label for labels in self.photos.values() for label in labels} - set(self.distractors)
        if self.closed and outside:
            raise ValueError(f"labels outside the closed vocabulary: {', '.join(sorted(outside))}")

    @property
    def vocabulary(self) -> tuple[str, ...]:
        if self.closed:
            return self.distractors
        labels = dict.fromkeys(label for labels in self.photos.values() for label in labels)
        return tuple(labels) + tuple(label for label in self.distractors if label not in labels)


CHECK = PhotoSet(
    photos={
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
    },
    distractors=("car", "pizza", "guitar"),
)
DEV = PhotoSet(
    photos={
        ("scikit-learn", "china.jpg"): ("building", "temple", "tree", "water", "sky"),
        ("scikit-learn", "flower.jpg"): ("flower", "plant"),
        ("matplotlib", "grace_hopper.jpg"): ("person", "woman", "flag", "hat"),
        ("scikit-image", "camera.png"): ("person", "man", "camera", "grass", "sky", "building"),
        ("scikit-image", "hubble_deep_field.jpg"): ("galaxy", "star", "space"),
        ("scikit-image", "coins.png"): ("coin",),
        ("plasma", "BytheWater/contents/images/2560x1600.jpg"): ("water", "lake", "pier"),
        ("plasma", "ColorfulCups/contents/images/2560x1600.jpg"): ("cup",),
        ("plasma", "EveningGlow/contents/images/2560x1600.jpg"): ("boat", "lake", "water", "mountain", "sky", "cloud"),
        ("plasma", "FallenLeaf/contents/images/2560x1600.jpg"): ("leaf",),
        ("plasma", "Kite/contents/images/2560x1600.jpg"): ("kite", "sky", "cloud"),
        ("plasma", "Path/contents/images/2560x1600.jpg"): ("forest", "tree", "path", "grass"),
        ("plasma", "ColdRipple/contents/images/2560x1600.jpg"): ("pier", "water", "fog"),
        ("opencv", "apple.jpg"): ("apple", "fruit", "food"),
        ("opencv", "baboon.jpg"): ("monkey", "animal"),
        ("opencv", "basketball1.png"): ("person", "man", "ball"),
        ("opencv", "building.jpg"): ("building", "tree", "sky", "grass"),
        ("opencv", "butterfly.jpg"): ("butterfly", "insect", "animal", "leaf", "plant"),
        ("opencv", "fruits.jpg"): ("fruit", "orange", "lemon", "kiwi", "food"),
        ("opencv", "home.jpg"): ("building", "palace", "bird", "animal", "sky", "cloud"),
        ("opencv", "messi5.jpg"): ("person", "man", "ball", "football", "sport", "grass"),
        ("opencv", "orange.jpg"): ("orange", "fruit", "food"),
        ("opencv", "aero1.jpg"): ("city", "building", "road", "tree", "water"),
        ("opencv", "squirrel_cls.jpg"): ("squirrel", "animal", "tree", "leaf"),
        ("opencv", "smarties.png"): ("candy", "food"),
        ("opencv", "leuvenA.jpg"): ("building", "house", "street", "sky"),
        ("opencv", "chicky_512.png"): ("dog", "animal"),
        ("opencv", "licenseplate_motion.jpg"): ("car",),
        ("mate", "Aqua.jpg"): ("water",),
        ("mate", "Blinds.jpg"): ("leaf", "plant"),
        ("mate", "Dune.jpg"): ("grass", "sea", "water", "sky"),
        ("mate", "FreshFlower.jpg"): ("flower", "plant"),
        ("mate", "Garden.jpg"): ("flower", "plant"),
        ("mate", "GreenMeadow.jpg"): ("grass", "plant"),
        ("mate", "LadyBird.jpg"): ("ladybird", "insect", "animal", "flower", "plant"),
        ("mate", "RainDrops.jpg"): ("leaf", "plant", "water"),
        ("mate", "Storm.jpg"): ("sky", "cloud", "road"),
        ("mate", "TwoWings.jpg"): ("dandelion", "plant"),
        ("mate", "YellowFlower.jpg"): ("flower", "plant"),
        ("mate", "Wood.jpg"): ("wood",),
    },
    distractors=("cat", "bicycle", "book", "clock", "guitar", "pizza", "horse", "train", "computer", "chair"),
)
# The same photos against NUS-WIDE's 81 concepts (the labels of its ZSL protocol), as a user with that
# vocabulary would tag them: plurals as NUS-WIDE spells them, the hypernyms "animal" on every animal
# and "vehicle" on land vehicles, "sports" with a sport; photos with none of the 81 keep no label.
NUSWIDE_81 = tuple(json.loads(resources.files("clip_decoder.data").joinpath("nuswide-81-unseen.json")
                              .read_text(encoding="utf-8"))["unseen"])
CHECK_NUS81 = PhotoSet(
    photos={
        ("darknet", "dog.jpg"): ("dog", "animal", "tree", "cars", "vehicle", "street"),
        ("darknet", "giraffe.jpg"): ("zebra", "animal", "tree", "grass"),
        ("darknet", "person.jpg"): ("person", "dog", "horses", "animal", "grass", "sky", "clouds"),
        ("darknet", "kite.jpg"): ("beach", "sand", "water", "person", "sky", "clouds"),
        ("darknet", "horses.jpg"): ("horses", "animal", "mountain", "snow", "grass", "sky", "clouds"),
        ("darknet", "eagle.jpg"): ("birds", "animal", "water"),
        ("scikit-image", "chelsea.png"): ("cat", "animal"),
        ("scikit-image", "coffee.png"): (),
        ("scikit-image", "astronaut.png"): ("person", "flags"),
        ("scikit-image", "rocket.jpg"): ("sky",),
        ("scikit-image", "motorcycle_left.png"): ("vehicle",),
    },
    distractors=NUSWIDE_81, closed=True,
)
DEV_NUS81 = PhotoSet(
    photos={
        ("scikit-learn", "china.jpg"): ("temple", "buildings", "tree", "water", "sky"),
        ("scikit-learn", "flower.jpg"): ("flowers", "plants"),
        ("matplotlib", "grace_hopper.jpg"): ("person", "flags", "military"),
        ("scikit-image", "camera.png"): ("person", "grass", "sky", "buildings", "tower"),
        ("scikit-image", "hubble_deep_field.jpg"): (),
        ("scikit-image", "coins.png"): (),
        ("plasma", "BytheWater/contents/images/2560x1600.jpg"): ("water", "lake", "sky", "clouds"),
        ("plasma", "ColorfulCups/contents/images/2560x1600.jpg"): (),
        ("plasma", "EveningGlow/contents/images/2560x1600.jpg"): ("boats", "lake", "water", "reflection", "mountain",
                                                                 "sky", "clouds", "sunset"),
        ("plasma", "FallenLeaf/contents/images/2560x1600.jpg"): ("leaf", "grass"),
        ("plasma", "Kite/contents/images/2560x1600.jpg"): ("sky", "clouds"),
        ("plasma", "Path/contents/images/2560x1600.jpg"): ("tree", "grass", "plants"),
        ("plasma", "ColdRipple/contents/images/2560x1600.jpg"): ("water", "lake"),
        ("opencv", "apple.jpg"): ("food",),
        ("opencv", "baboon.jpg"): ("animal",),
        ("opencv", "basketball1.png"): ("person", "sports"),
        ("opencv", "building.jpg"): ("buildings", "window", "tree", "sky", "grass"),
        ("opencv", "butterfly.jpg"): ("animal", "leaf", "plants"),
        ("opencv", "fruits.jpg"): ("food",),
        ("opencv", "home.jpg"): ("buildings", "tower", "birds", "animal", "sky", "clouds"),
        ("opencv", "messi5.jpg"): ("person", "soccer", "sports", "grass"),
        ("opencv", "orange.jpg"): ("food",),
        ("opencv", "aero1.jpg"): ("cityscape", "buildings", "road", "tree", "water"),
        ("opencv", "squirrel_cls.jpg"): ("animal", "tree", "leaf"),
        ("opencv", "smarties.png"): ("food",),
        ("opencv", "leuvenA.jpg"): ("buildings", "house", "street", "window", "sky", "clouds"),
        ("opencv", "chicky_512.png"): ("dog", "animal"),
        ("opencv", "licenseplate_motion.jpg"): ("cars", "vehicle"),
        ("mate", "Aqua.jpg"): ("water",),
        ("mate", "Blinds.jpg"): ("leaf", "plants"),
        ("mate", "Dune.jpg"): ("grass", "ocean", "water", "sky"),
        ("mate", "FreshFlower.jpg"): ("flowers", "plants"),
        ("mate", "Garden.jpg"): ("flowers", "plants"),
        ("mate", "GreenMeadow.jpg"): ("grass", "plants"),
        ("mate", "LadyBird.jpg"): ("animal", "flowers", "plants"),
        ("mate", "RainDrops.jpg"): ("leaf", "plants", "water", "grass"),
        ("mate", "Storm.jpg"): ("sky", "clouds", "road"),
        ("mate", "TwoWings.jpg"): ("plants", "flowers"),
        ("mate", "YellowFlower.jpg"): ("flowers", "plants"),
        ("mate", "Wood.jpg"): (),
    },
    distractors=NUSWIDE_81, closed=True,
)
PHOTO_SETS = {"check": CHECK, "dev": DEV, "check-nus81": CHECK_NUS81, "dev-nus81": DEV_NUS81}
DEFAULT_OUT = {"check": Path("data/photos"), "dev": Path("data/photos-dev"),
               "check-nus81": Path("data/photos-nus81"), "dev-nus81": Path("data/photos-dev-nus81")}


def source(package: str, name: str) -> Path:
    """Where an installed package keeps the photo ``name``; exits with the install command if it is missing."""
    where, install = SOURCES[package]
    if ":" in where:  # a Python package's folder
        module, folder = where.split(":")
        try:
            path = Path(str(resources.files(module))) / folder / name
        except ModuleNotFoundError:
            path = Path("/nonexistent") / name
    else:
        path = Path(where) / name
    if not path.is_file():
        sys.exit(f"error: no {path}: {install}")
    return path


def build(out: Path, photo_set: PhotoSet = CHECK) -> Path:
    """Copy the photos into ``out/images`` and write ``out/photos.csv`` and ``out/vocabulary.txt``."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for (package, name), labels in photo_set.photos.items():
        path = source(package, name)
        # Plasma wallpapers are all named by their size: the folder names the photo.
        stem = name.split("/")[0] + path.suffix if "/" in name else name
        target = out / "images" / f"{package}-{stem}"
        shutil.copyfile(path, target)
        rows.append((target.relative_to(out).as_posix(), labels))
    write_part(out, PHOTOS_PART, rows)
    (out / VOCABULARY_FILE).write_text("\n".join(photo_set.vocabulary) + "\n", encoding="utf-8")
    return out


def model_report(model: CLIPDecoder, folder: Path) -> str:
    """How ``model`` ranks and decides the photos in ``folder``: top-1, per-image AP, and micro decision F1 with
    yes per true label for its default rule, 0.5 and each photo's top 3."""
    photos = PhotoCheck.load(folder, FeatureCache(model.image_tower), progress=False)
    scores = model.scorer.score_stored(photos.features.tokens, photos.features.pooled, model.scorer.vocabulary(photos.labels))
    ranked = photos.metrics(scores, model.config.default_thresholds())
    lines = [f"top-1 correct {ranked['top1_correct']} of {ranked['images']}, per-image AP {ranked['per_image_AP']:.1f}"]
    for rule, result in ranked["decisions"].items():
        lines.append(f"{rule}: decision F1 {result['F1']:.1f}, yes per true label {result['yes_per_true']:.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = bench_parser(__doc__, target="nothing (it prints)")  # --data, --no-write
    parser.add_argument("--set", choices=tuple(PHOTO_SETS), default="check",
                        help="check: the photos the results report; dev: the photos choices are made on;"
                        " check-nus81 / dev-nus81: the same photos against NUS-WIDE's 81 concepts")
    parser.add_argument("--out", type=Path, default=None, help="the folder to write (default: data/photos,"
                        " data/photos-dev, data/photos-nus81 or data/photos-dev-nus81, by --set)")
    parser.add_argument("--splits", type=Path, nargs="*", default=[], metavar="JSON",
                        help="also train each method on these label splits and rank the photos")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=method_names(), default=list(method_names()))
    parser.add_argument("--model", default=None, metavar="NAME_OR_DIR",
                        help="also rank the photos with this trained model and report its decisions")
    args = parser.parse_args()
    photo_set, out = PHOTO_SETS[args.set], args.out or DEFAULT_OUT[args.set]
    print(f"{args.set} photos written to {build(out, photo_set)} ({len(photo_set.photos)} photos,"
          f" {len(photo_set.vocabulary)} labels)")
    if args.model:
        print(model_report(CLIPDecoder.from_pretrained(args.model), out))
    if not args.splits:
        return
    check_inputs(args.data, part="train")
    results = run_benchmark(args.data, args.splits, tuple(args.seeds), tuple(args.methods), photos=out)
    for name, per_method in results.items():
        print(f"\n### Photos, models trained on split `{name}`\n\n{photos_table(per_method)}")


if __name__ == "__main__":
    main()
