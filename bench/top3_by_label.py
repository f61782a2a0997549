"""How often each unseen label enters an image's top 3, by how the prior is centred: a look at a trained model.

It explains the ZSL F1@3 the benchmark reports (docs/EXPERIMENTS.md, "Decisions, and a prior without hubs"):
a label whose text sits near every image's prior vector (a "hub", high t . m) gains on every image unless its
prior is centred on its own mean. It reads the test part and the unseen labels, so it chooses nothing. The
model's prior is centred again on the training images at each share of per-label centring
(PriorConfig.centring: 1 per label, 0 one offset), then ranks the unseen labels on the test images that have one.
Run: python -m bench.top3_by_label --model models/bench/second-clip-decoder-seed0 --split data/openclipart/splits/second.json
"""

from __future__ import annotations

from dataclasses import replace

import torch

from bench.report import bench_parser, check_inputs, split_of
from clip_decoder.data.folder import read_part, read_split, training_parts
from clip_decoder.features import FeatureCache
from clip_decoder.metrics import top_k_mask, zsl_gzsl_metrics
from clip_decoder.model import CLIPDecoder
from clip_decoder.training.config import TrainConfig
from clip_decoder.training.data import FeatureSet


def main() -> None:
    parser = bench_parser(__doc__, split=True, model=True, target="nothing (it prints)")
    parser.add_argument("--centrings", type=float, nargs="+", default=[1.0, 0.5, 0.0], metavar="SHARE")
    args = parser.parse_args()
    check_inputs(args.data, split=split_of(args))
    model, split = CLIPDecoder.from_pretrained(args.model), read_split(split_of(args))
    cache = FeatureCache(model.image_tower)
    train = FeatureSet.build(training_parts(args.data, TrainConfig().val_fraction)[0], cache, progress=False)
    test = FeatureSet.build(read_part(args.data, "test"), cache, progress=False)
    labels, unseen = list(split.all), list(split.unseen)
    targets = test.targets(split.all).numpy()
    columns = [labels.index(label) for label in unseen]
    rows = targets[:, columns].any(axis=1)  # the ZSL images: those with an unseen label
    true_counts = targets[rows][:, columns].sum(axis=0)
    counts, f1 = {}, {}
    for centring in args.centrings:
        scorer = model.scorer.with_prior(replace(model.config.prior, centring=centring))
        scorer = scorer.with_prior(scorer.centred_prior(train.pooled, model.config.labels))
        scores = scorer.score_stored(test.tokens, test.pooled, scorer.vocabulary(labels))
        f1[centring] = zsl_gzsl_metrics(scores, targets, labels, unseen)["zsl"]["F1@3"]
        counts[centring] = top_k_mask(scores[rows][:, columns], 3).sum(axis=0)
    mean = torch.tensor(model.config.prior.reference_mean)  # the training images' mean prior vector
    hub = (model.scorer.vocabulary(unseen).queries.directions @ mean).tolist()
    shares = " | ".join(f"top 3s, centring {centring:g}" for centring in args.centrings)
    print(f"{int(rows.sum())} test images with an unseen label; ZSL F1@3 by centring: "
          + ", ".join(f"{centring:g}: {value:.1f}" for centring, value in f1.items()) + "\n")
    print(f"| unseen label | true on | t . m | {shares} |\n|---|---|---|" + "---|" * len(args.centrings))
    for j, label in enumerate(unseen):
        cells = " | ".join(str(int(counts[centring][j])) for centring in args.centrings)
        print(f"| {label} | {int(true_counts[j])} | {hub[j]:.3f} | {cells} |")


if __name__ == "__main__":
    main()
