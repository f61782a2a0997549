"""Choose how the zero-shot prior enters the logits, WITHOUT touching unseen labels, test images or the photo check.

The prior enters at scoring, so training does not depend on its settings: CLIP-Decoder is trained
once per nested split and seed (bench/tune.py's nested splits: a quarter of the seen labels held
out as pseudo-unseen; the real unseen labels and the test part are never read), then the same
model scores, under each setting of the grid (temperature, weight on trained labels, weight on the
others), the validation part (ZSL and GZSL over pseudo-seen + pseudo-unseen labels) and the dev
photos (bench/photos.py --set dev, never the photo check). Rule: the setting with the highest mean
of ZSL mAP, GZSL mAP, the dev photos' per-image AP, ZSL F1@3 and GZSL F1@3 (what each image's top 3
shows), averaged over the nested splits and seeds. Each model's prior is centred per label on its
training images, as training does (scoring.Scorer.centred_prior), at each temperature.
Run: python -m bench.prior_grid [--data DIR] [--splits JSON ...] [--seeds 0 1] [--photos data/photos-dev] [--no-write]
"""

from __future__ import annotations

import itertools
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path


from bench.report import bench_parser, check_inputs, command, machine, publish, shown
from bench.tune import DOC, HEADER, nested_split
from clip_decoder.benchmark import PhotoCheck
from clip_decoder.data.folder import carve_validation, read_split, training_parts
from clip_decoder.encoders import create_backbone
from clip_decoder.features import FeatureCache
from clip_decoder.metrics import per_image_metrics, zsl_gzsl_metrics
from clip_decoder.model import CLIPDecoder
from clip_decoder.prior import PriorConfig
from clip_decoder.training.config import TrainConfig
from clip_decoder.training.data import FeatureSet
from clip_decoder.training.loop import fit
from clip_decoder.training.methods import MethodRun, decoder_method, untrained_model

COLUMNS = ("ZSL mAP", "GZSL mAP", "dev photos AP", "ZSL F1@3", "GZSL F1@3", "dev photos top-1")
CRITERION_COLUMNS = 5  # the criterion: the mean of the first five COLUMNS


Setting = tuple[float, float, float]  # (temperature, weight on trained labels, weight on the others)


def grid_scores(model: CLIPDecoder, train: FeatureSet, evaluated: FeatureSet, photos: PhotoCheck, labels, unseen,
                grid: list[Setting]) -> dict[Setting, tuple[float, ...]]:
    """Each setting of ``grid`` -> the COLUMNS of one trained model, scored through its own scorer with that prior."""
    results = {}
    for temperature, settings in itertools.groupby(grid, key=lambda setting: setting[0]):
        # The reference mean depends on the temperature only.
        centred = model.scorer.with_prior(PriorConfig(temperature=temperature)).centred_prior(train.pooled)
        for setting in settings:
            _, seen_weight, weight = setting
            scorer = model.scorer.with_prior(replace(centred, weight=weight, seen_weight=seen_weight))
            scores = scorer.score_stored(evaluated.tokens, evaluated.pooled, scorer.vocabulary(labels))
            metrics = zsl_gzsl_metrics(scores, evaluated.targets(labels).numpy(), list(labels), list(unseen))
            on_photos = per_image_metrics(scorer.score_stored(photos.features.tokens, photos.features.pooled,
                                                              scorer.vocabulary(photos.labels)),
                                          photos.features.targets(photos.labels).numpy())
            results[setting] = (metrics["zsl"]["mAP"], metrics["gzsl"]["mAP"], on_photos["per_image_AP"],
                                metrics["zsl"]["F1@3"], metrics["gzsl"]["F1@3"], on_photos["top1_correct"])
    return results


def main() -> None:
    parser = bench_parser(__doc__, target="docs/EXPERIMENTS.md")  # --data, --no-write
    parser.add_argument("--splits", type=Path, nargs="+", default=None, metavar="JSON",
                        help="label splits to nest (default: DATA/splits/default.json and second.json)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--photos", type=Path, default=Path("data/photos-dev"), metavar="DIR",
                        help="the dev photos (python -m bench.photos --set dev); never the photo check")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1, 2, 3, 4, 6])
    parser.add_argument("--seen-weights", type=float, nargs="+", default=[0, 2, 5, 10])
    parser.add_argument("--weights", type=float, nargs="+", default=[10, 20, 30, 40])
    parser.add_argument("--show", type=int, default=15, help="rows of the table (best first)")
    parser.add_argument("--cache")
    args = parser.parse_args()
    splits = args.splits or [args.data / "splits" / f"{name}.json" for name in ("default", "second")]
    for split_path in splits:
        check_inputs(args.data, part="train", split=split_path)
    if not (args.photos / "photos.csv").is_file():
        sys.exit(f"error: no dev photos at {shown(args.photos)}; build them with `python -m bench.photos --set dev`")

    grid = list(itertools.product(args.temperatures, args.seen_weights, args.weights))
    towers, class_embeddings = create_backbone("offline"), {}  # the class names embedded once for every model
    cache = FeatureCache(towers.image, args.cache)
    photos = PhotoCheck.load(args.photos, cache, progress=False)
    config = TrainConfig()
    train_samples, val_samples = training_parts(args.data, config.val_fraction)
    inner_train, inner_val = carve_validation(train_samples, 0.1, salt="tune")
    parts = {name: FeatureSet.build(items, cache) for name, items in
             {"train": inner_train, "val": inner_val, "evaluated": val_samples}.items()}
    runs, started = [], time.perf_counter()
    for split_path, seed in itertools.product(splits, args.seeds):
        split = nested_split(read_split(split_path))
        recipe = decoder_method("clip-decoder").recipe(replace(config, seed=seed))
        model = untrained_model(recipe, towers)
        MethodRun(towers, parts, split, recipe.config, class_embeddings=class_embeddings).share_class_embeddings(
            model.zero_shot, recipe.templates)
        fit(model, parts["train"], parts["val"], split.seen, recipe, progress=False)
        runs.append(grid_scores(model, parts["train"], parts["evaluated"], photos, split.all, split.unseen, grid))
        print(f"{shown(split_path)} seed {seed}: trained and scored ({time.perf_counter() - started:.0f} s)", flush=True)

    means = {setting: [statistics.mean(run[setting][i] for run in runs) for i in range(len(COLUMNS))] for setting in grid}
    criterion = {setting: statistics.mean(values[:CRITERION_COLUMNS]) for setting, values in means.items()}
    ranked = sorted(grid, key=lambda setting: -criterion[setting])
    default = (PriorConfig.temperature, PriorConfig.seen_weight, PriorConfig.weight)
    previous = (1.0, 10.0, 10.0)  # the choice before: one weight for every label, the classifier's own probabilities
    shown_rows = ranked[: args.show] + [s for s in (default, previous) if s in means and s not in ranked[: args.show]]

    def row(setting: Setting) -> str:
        marks = " (default)" if setting == default else " (before)" if setting == previous else ""
        cells = " | ".join(f"{v:.1f}" for v in means[setting])
        return f"| {setting[0]:g} | {setting[1]:g} | {setting[2]:g}{marks} | {criterion[setting]:.1f} | {cells} |"

    table = "\n".join([
        "## Zero-shot prior: temperature and weights (nested splits and dev photos)", "",
        f"Command: `{command('prior_grid', sys.argv[1:])}`; {machine()}; {time.perf_counter() - started:.0f} s.",
        f"One CLIP-Decoder (default recipe) per nested split of {', '.join(f'`{shown(p)}`' for p in splits)} and seed"
        f" {args.seeds}, scored under {len(grid)} settings; validation part ({len(parts['evaluated'].samples)} images,"
        f" pseudo-seen + pseudo-unseen labels) and {len(photos.features.samples)} dev photos ({shown(args.photos)}),"
        " means over the runs. Criterion: the mean of ZSL mAP, GZSL mAP, dev photos AP, ZSL F1@3 and GZSL F1@3.", "",
        "| temperature | weight, trained labels | weight, other labels | criterion | " + " | ".join(COLUMNS) + " |",
        "|---|---|---|---|" + "---|" * len(COLUMNS),
        *(row(setting) for setting in shown_rows)])
    publish(table, section=None, no_write=args.no_write, doc=DOC, header=HEADER)


if __name__ == "__main__":
    main()
