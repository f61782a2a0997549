"""Shortlist mode's quality: ZSL and GZSL mAP with ``shortlist=K`` against exact scoring, on the benchmark.

For each seed, CLIP-Decoder is trained on the split's seen labels (cached features, the default
recipe); then the test images are scored exactly and with a shortlist of K labels per image:
over the split's own vocabulary (ZSL: the unseen labels; GZSL: all labels), and over that
vocabulary plus N distractor labels from bench/vocabulary.py. Exact scores do not change with
distractors (each label's score is independent of the others); the shortlist has to find the true
labels among them. mAP is over the benchmark's labels only. Mean over seeds.
Run: python -m bench.shortlist_quality [--data DIR] [--split JSON] [--seeds 0 1 2] [--ks 5 10 20 100] [--distractors 1000 10000]
"""

from __future__ import annotations

import statistics

import numpy as np

from bench.report import bench_parser, check_inputs, command, machine, publish, shown, split_of
from bench.vocabulary import large_vocabulary
from clip_decoder.data.folder import read_part, read_split, training_parts
from clip_decoder.encoders import create_backbone
from clip_decoder.features import FeatureCache
from clip_decoder.metrics import zsl_gzsl_metrics
from clip_decoder.model import CLIPDecoder
from clip_decoder.prompts import LabelEmbedder
from clip_decoder.training.config import TrainConfig
from clip_decoder.training.data import FeatureSet
from clip_decoder.training.loop import fit
from clip_decoder.training.methods import decoder_method, untrained_model

TOLERANCE = 0.5  # mAP points


def scores(model: CLIPDecoder, test: FeatureSet, labels: list[str], shortlist: int | None) -> np.ndarray:
    """Probabilities (n, len(labels)) of the cached test features."""
    return model.scorer.score_stored(test.tokens, test.pooled, model.scorer.vocabulary(labels), shortlist)


def zsl_gzsl_maps(model, test: FeatureSet, split, shortlist: int | None, distractors: list[str]) -> tuple[float, float]:
    """(ZSL mAP, GZSL mAP) with the given shortlist, distractors added to each vocabulary."""
    labels, unseen = list(split.all), list(split.unseen)
    targets = test.targets(split.all).numpy()
    zsl = np.zeros_like(targets, dtype=np.float32)  # ZSL reads only the unseen columns
    zsl[:, [labels.index(label) for label in unseen]] = scores(model, test, unseen + distractors, shortlist)[:, : len(unseen)]
    gzsl = scores(model, test, labels + distractors, shortlist)[:, : len(labels)]
    return (zsl_gzsl_metrics(zsl, targets, labels, unseen)["zsl"]["mAP"],
            zsl_gzsl_metrics(gzsl, targets, labels, unseen)["gzsl"]["mAP"])


def main() -> None:
    parser = bench_parser(__doc__, split=True)  # --data, --split, --no-write
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ks", type=int, nargs="+", default=[5, 10, 20, 100], help="shortlist sizes, own vocabulary")
    parser.add_argument("--distractors", type=int, nargs="*", default=[1000, 10000])
    parser.add_argument("--distractor-k", type=int, default=100, help="shortlist size with distractors")
    args = parser.parse_args()
    split_path = split_of(args)
    check_inputs(args.data, part="test", split=split_path)

    config = TrainConfig()
    split = read_split(split_path)
    towers = create_backbone("offline")
    embed_labels = LabelEmbedder(towers.text)  # shared by the seeds' models: each label is embedded once
    cache = FeatureCache(towers.image)
    train_samples, val_samples = training_parts(args.data, config.val_fraction)
    train, val, test = (FeatureSet.build(samples, cache) for samples in (train_samples, val_samples, read_part(args.data, "test")))
    cases = [(f"shortlist {k}", k, 0) for k in args.ks] + [(f"+{n:,} distractors, shortlist {args.distractor_k}", args.distractor_k, n)
                                                          for n in args.distractors]
    results: dict[str, list[tuple[float, float]]] = {"exact": []} | {name: [] for name, _, _ in cases}
    for seed in args.seeds:
        recipe = decoder_method("clip-decoder").recipe(TrainConfig(seed=seed))
        model = untrained_model(recipe, towers)
        model.scorer.embed_labels = embed_labels
        fit(model, train, val, split.seen, recipe)
        model.eval()
        results["exact"].append(zsl_gzsl_maps(model, test, split, None, []))
        for name, k, count in cases:
            distractors = large_vocabulary(count, exclude=set(split.all)) if count else []
            results[name].append(zsl_gzsl_maps(model, test, split, k, distractors))
            print(seed, name, results[name][-1], flush=True)

    exact_zsl = statistics.mean(z for z, _ in results["exact"])
    exact_gzsl = statistics.mean(g for _, g in results["exact"])
    rows, verdicts = [], []
    for name, runs in results.items():
        zsl, gzsl = statistics.mean(z for z, _ in runs), statistics.mean(g for _, g in runs)
        rows.append(f"| {name} | {zsl:.2f} | {zsl - exact_zsl:+.2f} | {gzsl:.2f} | {gzsl - exact_gzsl:+.2f} |")
        if name.endswith(f"shortlist {args.distractor_k}"):
            worst = min(zsl - exact_zsl, gzsl - exact_gzsl)
            verdicts.append(f"- {name}: " + ("**met**" if worst >= -TOLERANCE else f"**missed** by {-worst - TOLERANCE:.2f} points"))
    rerun = command("shortlist_quality", f"--data {shown(args.data)} --split {shown(split_path)}"
                    f" --seeds {' '.join(map(str, args.seeds))} --ks {' '.join(map(str, args.ks))}"
                    f" --distractors {' '.join(map(str, args.distractors))} --distractor-k {args.distractor_k}")
    table = "\n".join([
        "## Shortlist mode: quality against exact scoring",
        "",
        f"Command: `{rerun}`; {machine()}.",
        f"CLIP-Decoder trained with the default recipe on the seen labels of `{split_path.name}`, mean of"
        f" {len(args.seeds)} seeds. ZSL: the {len(split.unseen)} unseen labels (+ distractors);"
        f" GZSL: all {len(split.all)} labels (+ distractors). mAP over the benchmark's labels, percent.",
        "A shortlist at least as long as the vocabulary is exact.",
        "",
        "| scoring | ZSL mAP | vs exact | GZSL mAP | vs exact |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"Target: shortlist {args.distractor_k} within {TOLERANCE} points of exact on ZSL and GZSL mAP"
        f" (the benchmark's own vocabulary is shorter than {args.distractor_k}, so there it is exact by construction):",
        *verdicts,
    ])
    publish(table, section="shortlist_quality", no_write=args.no_write)


if __name__ == "__main__":
    main()
