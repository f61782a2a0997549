"""The ``clip-decoder`` command: parses arguments, calls the library, prints."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import ClipDecoderError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}


def expand_images(inputs: list[str]) -> list[Path]:
    """Files as given; folders expanded (recursively, sorted) to the image files inside."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise ClipDecoderError(f"folder {path} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            paths.extend(found)
        else:
            paths.append(path)
    return paths


def read_labels(args: argparse.Namespace) -> list[str]:
    """Labels from --labels (comma-separated) or --labels-file (one per line)."""
    if args.labels_file:
        try:
            text = Path(args.labels_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ClipDecoderError(f"cannot read labels file {args.labels_file}: {error}") from error
        labels = [line.strip() for line in text.splitlines()]
    else:
        labels = [part.strip() for part in args.labels.split(",")]
    labels = [label for label in labels if label]
    if not labels:
        raise ClipDecoderError("no labels given")
    return labels


def load_model(args: argparse.Namespace):
    from .model import CLIPDecoder

    if args.model:
        return CLIPDecoder.from_pretrained(args.model)
    print(
        f"warning: no --model given; using an UNTRAINED head on backbone {args.backbone!r}:"
        " scores are not meaningful until the head is trained",
        file=sys.stderr,
    )
    return CLIPDecoder.create(backbone=args.backbone)


def cmd_predict(args: argparse.Namespace) -> int:
    """Score every asked label for each image; print one JSON object per image."""
    from .images import load_image

    labels = read_labels(args)
    paths = expand_images(args.images)
    model = load_model(args)
    failures = 0
    for start in range(0, len(paths), args.batch_size):
        batch, images = [], []
        for path in paths[start : start + args.batch_size]:
            try:
                images.append(load_image(path))
                batch.append(path)
            except ClipDecoderError as error:
                failures += 1
                print(f"error: {error}", file=sys.stderr)
        if not images:
            continue
        scores = model.predict(images, labels, batch_size=args.batch_size)
        for path, row in zip(batch, scores):
            record = {"image": str(path), "scores": {l: round(float(s), 6) for l, s in zip(labels, row)}}
            print(json.dumps(record, ensure_ascii=False), flush=True)
    if failures:
        print(f"{failures} of {len(paths)} images failed", file=sys.stderr)
    return 1 if failures else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clip-decoder",
        description="Zero-shot multi-label image classification: a probability for any label name.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"clip-decoder {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    predict = commands.add_parser(
        "predict",
        help="score labels for images",
        description="Print one JSON line per image: {'image': path, 'scores': {label: probability}}."
        " Bad images are reported on stderr and skipped; the exit status is 1 if any failed.",
    )
    source = predict.add_mutually_exclusive_group()
    source.add_argument("--model", metavar="DIR", help="a model folder written by train or save_pretrained")
    source.add_argument(
        "--backbone", default="offline", help="with no --model: an untrained head on this backbone (smoke test)"
    )
    labels = predict.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", help="comma-separated label names")
    labels.add_argument("--labels-file", metavar="FILE", help="a text file with one label per line")
    predict.add_argument("--format", choices=["jsonl"], default="jsonl", help="output format (default jsonl)")
    predict.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    predict.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER")
    predict.set_defaults(run=cmd_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ClipDecoderError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
