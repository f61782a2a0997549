"""More seen / unseen label splits, drawn by the benchmark's own rule, to check a change beyond its two splits.

Each seed draws its unseen labels as the benchmark's splits were drawn (docs/DATASET.md, step 10: about a
quarter of the labels with at least 10 test positives), independently of the other seeds and of the
splits in the repository, so draws may share labels. It reads which labels the test part has and
chooses nothing. Score on them with the benchmark, for example:

  python -m bench.more_splits --seeds 2 3 4 5 6 7 --out models/more-splits
  clip-decoder bench --data data/openclipart --splits models/more-splits/*.json --seeds 0 \\
      --methods clip-decoder clip-decoder-no-prior ml-decoder --photos data/photos-dev --jobs 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.report import bench_parser, check_inputs
from clip_decoder.data.folder import read_part, write_split
from clip_decoder.data.openclipart import label_splits


def main() -> None:
    parser = bench_parser(__doc__, target="--out (print the draws only)",
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", required=True, metavar="N",
                        help="one split per seed (seed 0 draws default.json's unseen labels again)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for seed<N>.json")
    args = parser.parse_args()
    check_inputs(args.data)
    parts = {part: read_part(args.data, part) for part in ("train", "test")}
    test_labels = [set(sample.labels) for sample in parts["test"]]
    labels = sorted({label for samples in parts.values() for sample in samples for label in sample.labels})
    splits = label_splits(test_labels, labels, {f"seed{seed}": seed for seed in args.seeds}, overlap=True)
    if not args.no_write:
        args.out.mkdir(parents=True, exist_ok=True)
    for name, split in splits.items():
        if not args.no_write:
            write_split(args.out / f"{name}.json", split)
        print(f"{args.out / name}.json: unseen {', '.join(split.unseen)}")


if __name__ == "__main__":
    main()
