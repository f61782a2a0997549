"""Inference cost of CLIP-Decoder against plain zero-shot scoring, and the head's compute efficiency.

(a) End-to-end ``predict`` (decode, preprocess, image tower, head) in images/s at 10 to 10,000
    labels, exact and with ``shortlist=K``, against plain zero-shot scoring through the same
    pipeline: decode, preprocess, the image tower, then one dot product of the (linearly mapped)
    pooled image with the cached label embeddings. Vocabularies are embedded before timing; their
    one-time cost is a row of its own.
(b) The head alone: achieved GFLOP/s (FLOPs counted by torch's FlopCounterMode) against this
    machine's plain fp32 matmul (1024 x 1024 x 1024) in the same run.
(e) Peak resident memory of each case (sampled while it runs; the model is loaded in every case).
The model is the trained models' configuration (``CLIPDecoder.create()``'s head) with random
weights: speed does not depend on the weights. Labels come from bench/vocabulary.py.
Run: python -m bench.inference [--data DIR] [--images 32] [--repeats 3] [--no-write]
"""

from __future__ import annotations

import time

import torch
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from bench.report import PeakMemory, bench_parser, check_inputs, command, interleaved_medians, machine, publish, shown
from bench.vocabulary import large_vocabulary
from clip_decoder import CLIPDecoder
from clip_decoder.data.folder import read_part
from clip_decoder.decoding import DEFAULT_BATCH_SIZE, decoded_batches
from clip_decoder.encoders import ImageFeatures
from clip_decoder.prompts import SINGLE_TEMPLATE

SIZES = (10, 100, 1000, 10000)


def zero_shot_scores(model: CLIPDecoder, projection: torch.nn.Linear, images: list, embeddings: torch.Tensor, batch_size: int):
    """The baseline: plain zero-shot scoring, pooled image -> text space -> cosine with each label."""
    with torch.inference_mode():
        for batch in decoded_batches(images, model.image_tower.preprocess, batch_size):
            pooled = model.image_tower(torch.from_numpy(batch.pixels)).pooled
            torch.sigmoid(F.normalize(projection(pooled), dim=-1) @ embeddings.T)


def timed_cases(model, projection, images, labels, embeddings, args) -> dict:
    """The cases at one vocabulary size: the zero-shot baseline, exact, and the shortlist if shorter."""
    cases = {
        "zero-shot": lambda: zero_shot_scores(model, projection, images, embeddings, args.batch_size),
        "exact": lambda: model.predict(images, labels, batch_size=args.batch_size),
    }
    if len(labels) > args.shortlist:
        cases[f"shortlist {args.shortlist}"] = lambda: model.predict(
            images, labels, batch_size=args.batch_size, shortlist=args.shortlist)
    return cases


def head_efficiency(model: CLIPDecoder, sizes, batch_size: int, repeats: int) -> list[str]:
    """Rows of table (b): the head's GFLOP/s at each vocabulary size against a plain matmul."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    tokens = torch.randn(batch_size, 49, model.config.head.image_dim)
    features = ImageFeatures(tokens, tokens.mean(dim=1))
    rows = []
    for size in sizes:
        vocabulary = model.scorer.vocabulary(large_vocabulary(size))
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model.scorer.score(features, vocabulary)
        flops = counter.get_total_flops()

        def head() -> None:
            with torch.inference_mode():
                model.scorer.score(features, vocabulary)

        medians = interleaved_medians({"head": head, "matmul": lambda: a @ b}, repeats)
        head_gflops = flops / medians["head"] / 1e9
        matmul_gflops = 2 * 1024**3 / medians["matmul"] / 1e9
        rows.append(f"| {size:,} | {flops / batch_size / 1e6:,.1f} | {1000 * medians['head'] / batch_size:.2f} |"
                    f" {head_gflops:.1f} | {matmul_gflops:.1f} | {head_gflops / matmul_gflops:.0%} |")
    return rows


def main() -> None:
    parser = bench_parser(__doc__)  # --data (its test images), --no-write
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--shortlist", type=int, default=100, metavar="K")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    check_inputs(args.data, part="test")

    torch.manual_seed(0)
    model = CLIPDecoder.create(backbone="offline", templates=SINGLE_TEMPLATE)  # the trained head; one template: see below
    images = [sample.image for sample in read_part(args.data, "test")[: args.images]]
    projection = torch.nn.Linear(model.config.head.image_dim, model.config.head.text_dim)

    rows, per_image = [], {}
    for size in SIZES:
        labels = large_vocabulary(size)
        start = time.perf_counter()
        vocabulary = model.scorer.vocabulary(labels)
        vocabulary_s = time.perf_counter() - start
        cases = timed_cases(model, projection, images, labels, vocabulary.queries.directions, args)
        medians = interleaved_medians(cases, args.repeats)
        for name, function in cases.items():
            with PeakMemory() as memory:
                function()
            seconds = medians[name] / len(images)
            per_image[(size, name)] = seconds
            ratio = medians[name] / medians["zero-shot"]
            rows.append(f"| {size:,} | {name} | {1000 * seconds:.1f} | {1 / seconds:.1f} | {ratio:.2f}x |"
                        f" {memory.peak_mb:,.0f} | {vocabulary_s:.1f} s |")
        print(rows[-len(cases):], flush=True)

    efficiency = head_efficiency(model, (100, 1000, 10000), args.batch_size, args.repeats)
    shortlist_ms = 1000 * per_image[(10000, f"shortlist {args.shortlist}")]
    exact_100_ms = 1000 * per_image[(100, "exact")]
    at_1000 = float(efficiency[1].split("|")[-2].strip().rstrip("%")) / 100
    head_verdict = "met" if at_1000 >= 0.5 else f"missed by {0.5 - at_1000:.0%} of the matmul rate"
    shortlist_verdict = "met" if shortlist_ms <= 2 * exact_100_ms else f"missed: {shortlist_ms / exact_100_ms:.2f}x"
    rerun = command("inference", f"--data {shown(args.data)} --images {args.images} --batch-size {args.batch_size}"
                               f" --shortlist {args.shortlist} --repeats {args.repeats}")
    table = "\n".join([
        "## Inference: CLIP-Decoder against plain zero-shot scoring (CPU)",
        "",
        f"Command: `{rerun}`; {machine()}; medians of {args.repeats}, cases interleaved.",
        f"{args.images} test images of `{shown(args.data)}` (PNG), batch {args.batch_size}, default `offline` backbone,"
        " the trained models' head (d 256, FFN 512, cosine skip) with random weights, one prompt template.",
        "Baseline (zero-shot): the same decoding and image tower, then the pooled image mapped to the text"
        " space and one dot product with the cached label embeddings. Vocabulary: the labels' embedding and"
        " query projections, done once per label set and cached (not in the per-image times).",
        "",
        "| labels | mode | ms / image | images / s | time vs zero-shot | peak RSS (MiB) | vocabulary, once |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Target: shortlist {args.shortlist} at 10,000 labels costs at most 2x exact at 100 labels per image:"
        f" {shortlist_ms:.1f} vs {exact_100_ms:.1f} ms, {shortlist_ms / exact_100_ms:.2f}x, **{shortlist_verdict}**.",
        "",
        f"### The head alone, against a plain matmul (batch {args.batch_size}, 49 tokens)",
        "",
        "FLOPs are those torch's FlopCounterMode counts (matmuls and attention); norms and activations are not counted.",
        "",
        "| labels | MFLOP / image | head ms / image | head GFLOP/s | matmul 1024³ GFLOP/s | head / matmul |",
        "|---|---|---|---|---|---|",
        *efficiency,
        "",
        f"Target: the exact head reaches at least 50% of the matmul rate (at 1,000 labels): {at_1000:.0%}, **{head_verdict}**.",
    ])
    publish(table, section="inference", no_write=args.no_write)


if __name__ == "__main__":
    main()
