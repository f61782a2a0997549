"""Choose how the zero-shot prior enters the logits, WITHOUT touching unseen labels, test images or the photo check.

The prior enters at scoring, so training does not depend on its settings: CLIP-Decoder is trained
once per nested split and seed (bench/tune.py's nested splits: a quarter of the seen labels held
out as pseudo-unseen; the real unseen labels and the test part are never read), then the same
model scores, under each setting of the grid (centring, temperature, weight on trained labels, weight
on the others, confidence weight: added to both, times the ImageNet classifier's top probability on the image),
the validation part (ZSL and GZSL over pseudo-seen + pseudo-unseen labels) and the dev
photos (bench/photos.py --set dev, never the photo check). Rule: the setting with the highest mean
of ZSL mAP, GZSL mAP, the dev photos' per-image AP, ZSL F1@3 and GZSL F1@3 (what each image's top 3
shows), averaged over the nested splits and seeds. Each model's prior is centred on its training images
at each temperature, with each share of per-label centring (PriorConfig.centring; scoring.Scorer.centred_prior):
1 per label, 0 one offset for every label (as models before format 3), between a share of each.
Decision F1 is reported beside (the default rule: thresholds.NEW_LABEL_THRESHOLD was chosen on it).
Run: python -m bench.prior_grid [--data DIR] [--splits JSON ...] [--nested 0 1 2] [--seeds 0 1] [--centrings ...]
     [--temperatures ...] [--seen-weights ...] [--weights ...] [--confidence-weights ...] [--photos data/photos-dev] [--no-write]
"""

from __future__ import annotations

import itertools
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench.report import bench_parser, check_inputs, command, machine, publish, shown
from bench.tune import DOC, HEADER, nested_split
from clip_decoder.benchmark import PhotoCheck
from clip_decoder.configs import PriorConfig
from clip_decoder.data.folder import carve_validation, read_split, training_parts
from clip_decoder.encoders import create_backbone
from clip_decoder.features import FeatureCache
from clip_decoder.metrics import micro_prf, per_image_metrics, zsl_gzsl_metrics
from clip_decoder.model import CLIPDecoder
from clip_decoder.thresholds import NEW_LABEL_THRESHOLD, Thresholds, best_threshold
from clip_decoder.training.config import TrainConfig
from clip_decoder.training.data import FeatureSet
from clip_decoder.training.loop import fit
from clip_decoder.training.methods import MethodRun, decoder_method, untrained_model

COLUMNS = ("ZSL mAP", "GZSL mAP", "dev photos AP", "ZSL F1@3", "GZSL F1@3", "dev photos top-1",
           "ZSL decision F1", "dev photos decision F1")
CRITERION_COLUMNS = 5  # the criterion: the mean of the first five COLUMNS
# How the prior is centred (PriorConfig.centring): the share of per-label centring on the training images' mean
# prior vector (1: per label; 0: one mean cosine for every label, as models before format 3 were centred).
CENTRINGS = (1.0, 0.5, 0.0)

# (centring, temperature, weight on trained labels, weight on the others, confidence weight)
Setting = tuple[float, float, float, float, float]


def centred(model: CLIPDecoder, train: FeatureSet, temperature: float, centring: float) -> PriorConfig:
    """The model's prior at ``temperature``, centred on the training images with this share of per-label centring."""
    scorer = model.scorer.with_prior(PriorConfig(temperature=temperature, centring=centring))
    return scorer.centred_prior(train.pooled, model.config.labels)


def decided(scores: np.ndarray, targets: np.ndarray, labels, rule: Thresholds) -> tuple[float, float]:
    """Decision F1 and yes per true label (micro) of ``rule``."""
    result = micro_prf(scores, targets, rule.for_labels(labels))
    return result["F1"], result["yes_per_true"]


def grid_scores(model: CLIPDecoder, parts: dict[str, FeatureSet], photos: PhotoCheck, split, grid: list[Setting],
                new_label_thresholds: list[float]) -> dict[Setting, tuple[tuple[float, ...], dict]]:
    """Each setting of ``grid`` -> (the COLUMNS of one trained model, scored through its own scorer with that prior,
    {new-label threshold: (pseudo-unseen decision F1, yes per true; dev photos decision F1, yes per true)}). Decisions
    by the default rule, the trained labels' threshold chosen on the inner validation part as training does; the
    COLUMNS' at thresholds.NEW_LABEL_THRESHOLD."""
    results, labels, seen = {}, list(split.all), list(split.seen)
    evaluated, val = parts["evaluated"], parts["val"]
    for (centring, temperature), settings in itertools.groupby(grid, key=lambda setting: setting[:2]):
        prior = centred(model, parts["train"], temperature, centring)
        for setting in settings:
            scorer = model.scorer.with_prior(replace(prior, seen_weight=setting[2], weight=setting[3],
                                                     confidence_weight=setting[4]))
            threshold, _ = best_threshold(scorer.score_stored(val.tokens, val.pooled, scorer.vocabulary(seen)),
                                          val.targets(seen).numpy())
            scores = scorer.score_stored(evaluated.tokens, evaluated.pooled, scorer.vocabulary(labels))
            targets = evaluated.targets(labels).numpy()
            metrics = zsl_gzsl_metrics(scores, targets, labels, list(split.unseen))
            photo_scores = scorer.score_stored(photos.features.tokens, photos.features.pooled, scorer.vocabulary(photos.labels))
            photo_targets = photos.features.targets(photos.labels).numpy()
            on_photos = per_image_metrics(photo_scores, photo_targets)
            unseen = [labels.index(label) for label in split.unseen]
            decisions = {}
            for new_labels in sorted({NEW_LABEL_THRESHOLD, *new_label_thresholds}):
                rule = Thresholds(default=threshold, new_labels=new_labels, trained_labels=frozenset(seen))
                decisions[new_labels] = (*decided(scores[:, unseen], targets[:, unseen], list(split.unseen), rule),
                                         *decided(photo_scores, photo_targets, photos.labels, rule))
            results[setting] = ((metrics["zsl"]["mAP"], metrics["gzsl"]["mAP"], on_photos["per_image_AP"],
                                 metrics["zsl"]["F1@3"], metrics["gzsl"]["F1@3"], on_photos["top1_correct"],
                                 decisions[NEW_LABEL_THRESHOLD][0], decisions[NEW_LABEL_THRESHOLD][2]), decisions)
    return results


def main() -> None:
    parser = bench_parser(__doc__, target="docs/EXPERIMENTS.md")  # --data, --no-write
    parser.add_argument("--splits", type=Path, nargs="+", default=None, metavar="JSON",
                        help="label splits to nest (default: DATA/splits/default.json and second.json)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds")
    parser.add_argument("--nested", type=int, nargs="+", default=[0], metavar="SEED",
                        help="draws of the pseudo-unseen labels from each split's seen labels (bench.tune.nested_split)")
    parser.add_argument("--centrings", type=float, nargs="+", default=list(CENTRINGS), metavar="SHARE",
                        help="shares of per-label centring (1: per label, as training does; 0: one offset)")
    parser.add_argument("--photos", type=Path, default=Path("data/photos-dev"), metavar="DIR",
                        help="the dev photos (python -m bench.photos --set dev); never the photo check")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1, 2, 3, 4, 6])
    parser.add_argument("--seen-weights", type=float, nargs="+", default=[0, 2, 5, 10])
    parser.add_argument("--weights", type=float, nargs="+", default=[10, 20, 30, 40])
    parser.add_argument("--confidence-weights", type=float, nargs="+", default=[0, 10])
    parser.add_argument("--new-label-thresholds", type=float, nargs="+", default=[0.62, 0.68, 0.73, 0.78, 0.82],
                        metavar="T", help="the default rule's threshold for labels the model was not trained on:"
                        " decision F1 at each, for the best and the default setting (a second table)")
    parser.add_argument("--show", type=int, default=15, help="rows of the table (best first)")
    parser.add_argument("--cache")
    args = parser.parse_args()
    splits = args.splits or [args.data / "splits" / f"{name}.json" for name in ("default", "second")]
    for split_path in splits:
        check_inputs(args.data, part="train", split=split_path)
    if not (args.photos / "photos.csv").is_file():
        sys.exit(f"error: no dev photos at {shown(args.photos)}; build them with `make photos-dev` (or `python -m bench.photos --set dev`)")

    grid = list(itertools.product(args.centrings, args.temperatures, args.seen_weights, args.weights,
                                  args.confidence_weights))
    towers, class_embeddings = create_backbone("offline"), {}  # the class names embedded once for every model
    cache = FeatureCache(towers.image, args.cache)
    photos = PhotoCheck.load(args.photos, cache, progress=False)
    config = TrainConfig()
    train_samples, val_samples = training_parts(args.data, config.val_fraction)
    inner_train, inner_val = carve_validation(train_samples, 0.1, salt="tune")
    parts = {name: FeatureSet.build(items, cache) for name, items in
             {"train": inner_train, "val": inner_val, "evaluated": val_samples}.items()}
    runs, started = [], time.perf_counter()
    for split_path, nested, seed in itertools.product(splits, args.nested, args.seeds):
        split = nested_split(read_split(split_path), seed=nested)
        recipe = decoder_method("clip-decoder").recipe(replace(config, seed=seed))
        model = untrained_model(recipe, towers)
        MethodRun(towers, parts, split, recipe.config, class_embeddings=class_embeddings).share_class_embeddings(
            model.zero_shot, recipe.templates)
        fit(model, parts["train"], parts["val"], split.seen, recipe, progress=False)
        runs.append(grid_scores(model, parts, photos, split, grid, args.new_label_thresholds))
        print(f"{shown(split_path)} nested draw {nested} seed {seed}: trained and scored ({time.perf_counter() - started:.0f} s)", flush=True)

    means = {setting: [statistics.mean(run[setting][0][i] for run in runs) for i in range(len(COLUMNS))] for setting in grid}
    criterion = {setting: statistics.mean(values[:CRITERION_COLUMNS]) for setting, values in means.items()}
    ranked = sorted(grid, key=lambda setting: -criterion[setting])
    default = (PriorConfig.centring, PriorConfig.temperature, PriorConfig.seen_weight, PriorConfig.weight,
               PriorConfig.confidence_weight)
    others = [(centring, *default[1:]) for centring in CENTRINGS]  # the same weights, each centring
    shown_rows = ranked[: args.show] + [s for s in dict.fromkeys((default, *others)) if s in means and s not in ranked[: args.show]]

    def row(setting: Setting) -> str:
        cells = " | ".join(f"{v:.1f}" for v in means[setting])
        mark = " (default)" if setting == default else ""
        return (f"| {setting[0]:g} | {setting[1]:g} | {setting[2]:g} | {setting[3]:g} | {setting[4]:g}{mark} |"
                f" {criterion[setting]:.2f} | {cells} |")

    def threshold_row(setting: Setting, threshold: float) -> str:
        values = [statistics.mean(run[setting][1][threshold][i] for run in runs) for i in range(4)]
        name = ", ".join(f"{value:g}" for value in setting) + (" (default)" if setting == default else "")
        return f"| {name} | {threshold:g} | {values[0]:.1f} ({values[1]:.2f}) | {values[2]:.1f} ({values[3]:.2f}) |"

    table = "\n".join([
        "## Zero-shot prior: centring, temperature and weights (nested splits and dev photos)", "",
        f"Command: `{command('prior_grid', sys.argv[1:])}`; {machine()}; {time.perf_counter() - started:.0f} s.",
        f"One CLIP-Decoder (default recipe) per nested split of {', '.join(f'`{shown(p)}`' for p in splits)}, draw of"
        f" pseudo-unseen labels {args.nested} and seed {args.seeds}, scored under {len(grid)} settings; validation part"
        f" ({len(parts['evaluated'].samples)} images, pseudo-seen + pseudo-unseen labels) and"
        f" {len(photos.features.samples)} dev photos ({shown(args.photos)}), means over the runs. Criterion: the mean of"
        " ZSL mAP, GZSL mAP, dev photos AP, ZSL F1@3 and GZSL F1@3. Decision F1 (micro, pseudo-unseen labels on the"
        f" validation part; every label on the dev photos): the default rule, trained labels at the threshold chosen on"
        f" the inner validation part, the others at {NEW_LABEL_THRESHOLD}.", "",
        "| per-label centring | temperature | weight, trained labels | weight, other labels | confidence weight | criterion | "
        + " | ".join(COLUMNS) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(COLUMNS),
        *(row(setting) for setting in shown_rows), "",
        "The default rule's threshold for labels the model was not trained on (trained labels: the validation cut),"
        " mean over the runs: decision F1 (yes per true label) on the pseudo-unseen labels and on the dev photos.", "",
        "| setting | new-label threshold | pseudo-unseen decision F1 | dev photos decision F1 |", "|---|---|---|---|",
        *(threshold_row(setting, threshold) for setting in dict.fromkeys((ranked[0], default)) if setting in means
          for threshold in runs[0][setting][1])])
    publish(table, section=None, no_write=args.no_write, doc=DOC, header=HEADER)


if __name__ == "__main__":
    main()
