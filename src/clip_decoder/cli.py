"""The ``clip-decoder`` command: parses arguments, calls the library, prints."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from .allocator import keep_freed_memory
from .atomic import write_file
from .cli_parser import COMMANDS, build_parser, feature_location, prior_changes, training_config
from .errors import ClipDecoderError


def read_labels(args: argparse.Namespace) -> list[str]:
    """Labels from --labels (comma-separated) or --labels-file (one per line)."""
    from .prompts import split_labels

    if args.labels_file:
        try:
            text = Path(args.labels_file).read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as error:
            raise ClipDecoderError(f"cannot read labels file {args.labels_file}: {error}") from error
        labels = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        labels = split_labels([args.labels])
    if not labels:
        raise ClipDecoderError("no labels given")
    return labels


def check_tagger_options(args: argparse.Namespace) -> None:
    """What --backbone (a tower alone) and --runtime onnx cannot be asked for, refused before anything loads."""
    if args.backbone:
        options = {"--runtime onnx": args.runtime == "onnx", "--prior-weight": args.prior_weight is not None,
                   "--prior-seen-weight": args.prior_seen_weight is not None,
                   "--calibrated": getattr(args, "calibrated", False), "--heatmaps": getattr(args, "heatmaps", None)}
        asked = [option for option, given in options.items() if given]  # (serve has no --calibrated, --heatmaps)
        if asked:
            raise ClipDecoderError(f"{asked[0]} needs a trained model (--model); --backbone tags with the tower alone")
    if args.runtime == "onnx" and getattr(args, "shortlist", None) is not None:
        raise ClipDecoderError("--shortlist is not available with --runtime onnx: the export scores every label")


def model_folder(args: argparse.Namespace):
    """The folder --model names: a model folder (ModelFolder), or with ``--runtime onnx`` an export
    (onnx_model.ExportFolder, its manifest checked). Both give ``default_rule()`` (which reads and checks the
    model's config: before anything loads) and ``thresholds()``."""
    if args.runtime == "onnx":
        from .onnx_model import ExportFolder

        return ExportFolder.find(args.model)
    from .model_folder import ModelFolder

    return ModelFolder.find(args.model)


def load_model(args: argparse.Namespace, label_cache: Path | None = None):
    """The model --model names (an export with --runtime onnx, run without torch), scoring with the prior
    --prior-weight / --prior-seen-weight ask for; or with --backbone, that tower alone (zero_shot)."""
    if args.backbone:
        from .zero_shot import ZeroShotTagger

        return ZeroShotTagger.load(args.backbone, label_cache=label_cache)
    changes = prior_changes(args)
    if args.runtime == "onnx":
        from .onnx_model import OnnxModel

        model = OnnxModel.load(args.model, label_cache=label_cache)
        model.set_prior_weights(**changes)
        return model
    from .model import CLIPDecoder

    model = CLIPDecoder.from_pretrained(args.model, label_cache=label_cache)
    if changes:
        model.set_prior(replace(model.config.prior, **changes))
    return model


def cmd_predict(args: argparse.Namespace) -> int:
    """Score every asked label for each image; print one record per image as it is scored."""
    from tqdm.auto import tqdm

    from .caches import default_cache_dir
    from .decisions import Decider
    from .heatmaps import write_heatmaps
    from .inputs import expand_images
    from .prompts import TEMPLATE_SETS
    from .thresholds import Thresholds
    from .writers import Writer

    # Everything the user gave is checked before the model loads.
    labels = read_labels(args)
    paths, problems = expand_images(args.images, args.images_from)  # problems: missing files, empty folders, ...
    check_tagger_options(args)
    folder = None if args.backbone else model_folder(args)
    default_rule = Thresholds() if folder is None else folder.default_rule()  # (a tower alone: 0.5)
    thresholds = Thresholds.read(args.thresholds) if args.thresholds else None
    if args.calibrated:  # (refused with --backbone by check_tagger_options)
        thresholds = folder.thresholds()
    decider = Decider.for_options(default_rule, args.top_k, args.threshold, thresholds)
    if args.out:
        return tag_to_folder(args, folder, paths, problems, labels, decider)
    writer = Writer(sys.stdout, args.format, labels, decider)
    for message in problems:
        print(f"error: {message}", file=sys.stderr)
    failures, inputs = len(problems), len(paths) + len(problems)
    if paths:
        model = load_model(args, label_cache=default_cache_dir())  # label embeddings kept on disk across runs
        templates = None if args.templates == "model" else TEMPLATE_SETS[args.templates]
        batches = model.predict_batches(paths, labels, templates, batch_size=args.batch_size, shortlist=args.shortlist,
                                        attention=bool(args.heatmaps))
        with tqdm(total=len(paths), desc="predict", unit="img", disable=None, file=sys.stderr) as bar:
            for batch in batches:
                for message in batch.failed.values():
                    failures += 1
                    bar.write(f"error: {message}", file=sys.stderr)
                for row, (index, scores) in enumerate(zip(batch.indices, batch.scores)):
                    chosen = writer.write(str(paths[index]), scores)
                    if args.heatmaps:
                        write_heatmaps(args.heatmaps, str(paths[index]), labels, chosen, batch.attention[row],
                                       model.preprocess)
                bar.update(len(batch.indices) + len(batch.failed))
    if failures:
        print(f"{failures} of {inputs} images failed", file=sys.stderr)
    return 1 if failures else 0


def model_identity(args: argparse.Namespace, folder) -> str:
    """What --model / --backbone name (``folder``: model_folder's, None for a tower alone), as the hashes of the model's
    files (a tower alone: its name), for predict --out's run."""
    if folder is None:
        return args.backbone
    if args.runtime == "onnx":
        return "onnx:" + folder.manifest["model"]["sha256"]
    from .caches import file_key
    from .model_folder import CONFIG_FILE, WEIGHTS_FILE

    return "/".join(file_key(folder / name) for name in (CONFIG_FILE, WEIGHTS_FILE))


def tag_to_folder(args: argparse.Namespace, folder, paths: list, problems: list[str], labels: list[str], decider) -> int:
    """predict --out: this process's share of the images into the folder's part files (library)."""
    import hashlib

    from .caches import default_cache_dir
    from .library import Library, process_rank, tag_library
    from .prompts import TEMPLATE_SETS

    if args.heatmaps or args.shortlist is not None:
        raise ClipDecoderError("--out writes scores and decided labels; --heatmaps and --shortlist are for runs to stdout")
    library = Library(args.out, args.out_format, args.part_size)
    rank, world = process_rank()
    templates = None if args.templates == "model" else TEMPLATE_SETS[args.templates]
    decision = {"top_k": args.top_k, "threshold": args.threshold, "thresholds": args.thresholds, "calibrated": args.calibrated}
    inputs = hashlib.sha256()
    for path in paths:
        inputs.update(f"{path}\n".encode())
    library.start({"model": model_identity(args, folder), "labels": labels, "templates": args.templates, "decision": decision,
                   "inputs": {"count": len(paths), "sha256": inputs.hexdigest()}},
                  rank)  # before the model loads: another run's folder is refused at once
    if rank == 0:
        for message in problems:
            print(f"error: {message}", file=sys.stderr)
    model = load_model(args, label_cache=default_cache_dir())
    scored, failures = tag_library(model, paths, labels, decider, library, templates, args.batch_size,
                                   report=lambda message: print(f"error: {message}", file=sys.stderr))
    done = library.results_path.is_file()
    print(f"{scored} images scored{f', {failures} failed' if failures else ''} by this process;"
          f" {'all done: ' + str(library.results_path) if done else 'parts in ' + str(library.folder / 'parts')}",
          file=sys.stderr)
    if world > 1:  # torchrun takes a non-zero exit for a crash and restarts the group: the failures are in the rows
        return 0
    return 1 if failures or problems else 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a model as ONNX graphs and a manifest, for predict / serve --runtime onnx."""
    from .export import export_model
    from .model import CLIPDecoder

    model = CLIPDecoder.from_pretrained(args.model)
    manifest = export_model(model, args.out, source=args.model)
    size = sum(entry["bytes"] for entry in manifest["files"].values())
    worst = max(manifest["check"]["max_abs_difference"].values())
    print(f"export written to {args.out} ({size / 2**20:.0f} MiB; largest difference from torch on sample inputs"
          f" {worst:.1e}); run it with `clip-decoder predict --runtime onnx --model {args.out} ...`")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train CLIP-Decoder on the seen labels and write a model folder."""
    from .data.folder import read_split
    from .distributed import World
    from .training.run import train_model

    split = read_split(args.split)
    model = train_model(args.data, split, args.out, args.backbone, training_config(args), feature_location(args),
                        resume=args.resume, checkpoint_every=args.checkpoint_every)
    if World.from_env().is_main:  # under torchrun, rank 0 wrote the model folder
        print(f"model written to {args.out} ({len(model.config.labels)} seen labels)")
    return 0


def counts(metrics: dict) -> str:
    """What one part of the metrics JSON was measured on."""
    return (f"{metrics['n_images']} images, {metrics['n_labels']} labels"
            f" ({metrics['n_labels_without_positives']} without a positive, left out of the mAP)")


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Print the ZSL / GZSL table of the test set and write the metrics JSON."""
    from .data.folder import read_split
    from .evaluate import evaluate_model, format_table
    from .metrics import ZSL_IMAGES
    from .model import CLIPDecoder

    split = read_split(args.split)
    model = CLIPDecoder.from_pretrained(args.model)
    metrics = evaluate_model(model, args.data, split, feature_location(args), zsl_images=args.zsl_images)
    print(format_table({Path(args.model).name or "model": metrics}))
    print(f"ZSL on {ZSL_IMAGES[args.zsl_images]}: {counts(metrics['zsl'])}; GZSL: {counts(metrics['gzsl'])}")
    if args.json:
        write_file(args.json, json.dumps(metrics, indent=2) + "\n")
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    """Extract a dataset folder's image features into a feature store (split across torchrun processes)."""
    from .distributed import World
    from .encoders import create_backbone
    from .features.extract import extract_features
    from .model import CLIPDecoder

    tower = CLIPDecoder.from_pretrained(args.model).image_tower if args.model else create_backbone(args.backbone).image
    summary = extract_features(args.data, args.store, tower, tuple(args.parts), batch_size=args.batch_size)
    if World.from_env().is_main:
        print(f"{summary['images']} images in the feature store {summary['folder']}; encoded now, per process:"
              f" {summary['encoded_per_process']}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Choose per-label thresholds on validation images, measure them on the test part, store them."""
    from .calibrate import calibrate_model
    from .data.folder import read_split
    from .model import CLIPDecoder
    from .model_folder import ModelFolder

    folder = ModelFolder.find(args.model).writable()  # before the work: thresholds.json is written into it
    model = CLIPDecoder.from_pretrained(folder.path)
    table = calibrate_model(model, args.data, read_split(args.split), feature_location(args), args.val_fraction)
    path = folder.write_thresholds(table)
    print(f"default threshold {table['default']:.3f}; own thresholds for {len(table['labels'])} labels; written to {path}")
    print(f"held-out test images ({table['held_out']['test_images']}), micro precision / recall / F1 (percent):")
    for part, rows in table["held_out"].items():
        if isinstance(rows, dict):
            for rule, m in rows.items():
                print(f"  {part:6} {rule:15} {m['precision']:6.1f} {m['recall']:6.1f} {m['F1']:6.1f}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the HTTP API and the web page around one model."""
    import uvicorn

    from .serve import Limits, create_app, fit_file_limit, server_options

    check_tagger_options(args)
    limits = Limits(**{name: value for name, value in vars(args).items() if name.startswith("max_")})
    fit_file_limit(limits)
    app = create_app(load_model(args), limits)
    print(f"serving {args.backbone or args.model} at http://{args.host}:{args.port}/ (API docs at /docs, limits at /health)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", **server_options(limits))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """Build the OpenClipart benchmark, or convert COCO / NUS-WIDE annotations to a dataset folder."""
    if args.builder != "openclipart":
        return convert(args)
    from .data.openclipart import build_openclipart

    stats = build_openclipart(Path(args.out), Path(args.source) if args.source else None,
                              image_size=args.image_size, min_images=args.min_images)
    print(json.dumps(stats, indent=2))
    return 0


def convert(args: argparse.Namespace) -> int:
    """Convert COCO or NUS-WIDE annotations to a dataset folder with a label split."""
    from .data.coco import convert_coco
    from .data.folder import read_split
    from .data.nuswide import convert_nuswide, convert_nuswide_csv

    if args.builder == "coco":
        split = None if args.split == "none" else (read_split(args.split) if args.split.endswith(".json") else args.split)
        counts = convert_coco(args.train_json, args.train_images, args.test_json, args.test_images, args.out, split)
    elif args.builder == "nuswide":
        counts = convert_nuswide(args.root, args.out, args.images)
    else:
        counts = convert_nuswide_csv(args.csv, args.out, args.images, read_split(args.split) if args.split else None)
    print(f"wrote {args.out}: " + ", ".join(f"{part}.csv {n} images" for part, n in counts.items()))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Train and evaluate CLIP-Decoder and the baselines over seeds and label splits."""
    import time

    from .benchmark import photos_table, results_markdown, run_benchmark, summary_table, zsl_section

    started = time.perf_counter()
    config = training_config(args, seed=args.seeds[0])
    results = run_benchmark(args.data, [Path(p) for p in args.splits], tuple(args.seeds), tuple(args.methods),
                            args.backbone, config, feature_location(args), photos=args.photos,
                            save_models=args.save_models, zsl_images=args.zsl_images, jobs=args.jobs)
    sections = [f"### Label split `{name}`\n\n{summary_table(per_method)}\n\n{zsl_section(per_method, args.zsl_images)}"
                + (f"\n\nPhotos:\n\n{photos_table(per_method)}" if args.photos else "")
                for name, per_method in results.items()]
    print("\n\n".join(sections))
    if args.json:
        write_file(args.json, json.dumps(results, indent=2) + "\n")
    if args.markdown:
        command = "clip-decoder " + " ".join(sys.argv[1:]) if sys.argv[1:] else "clip-decoder bench"
        write_file(args.markdown, results_markdown(results, args.data, command, time.perf_counter() - started, config,
                                                   args.zsl_images))
    return 0


# The commands that run a tower batch after batch and train nothing: glibc's malloc is set for them
# (allocator.keep_freed_memory; `bench --jobs N` sets it in its extracting process). `train` keeps glibc's
# defaults; `serve` too, until its memory over many requests is measured with it (bench.service_memory).
TOWER_COMMANDS = ("predict", "extract")
RUN = {"predict": cmd_predict, "export": cmd_export, "train": cmd_train, "calibrate": cmd_calibrate, "serve": cmd_serve,
       "evaluate": cmd_evaluate, "extract": cmd_extract, "data": cmd_data, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((word for word in argv if not word.startswith("-")), None)
    name = command if command in COMMANDS else ""  # no known command (--help, --version): no command's options
    try:
        args = build_parser(name).parse_args(argv)  # (a command's options may import what it needs)
        if args.command in TOWER_COMMANDS:
            keep_freed_memory()
        return RUN[args.command](args)
    except ModuleNotFoundError as error:  # an install without some requirement (e.g. the torch-free one)
        if not error.name or error.name.startswith("clip_decoder"):
            raise
        hint = (" (an install without torch runs exports: `predict` / `serve --runtime onnx --model EXPORT_DIR`)"
                if error.name in ("torch", "transformers") else "")
        print(f"error: `clip-decoder {name}` needs the {error.name} package, which is not installed{hint}",
              file=sys.stderr)
        return 2
    except (ClipDecoderError, OSError) as error:  # one line, no traceback, even for messages that quote several
        # OSError: a path the user gave that cannot be written or read (its message names it).
        print("error: " + " ".join(line.strip() for line in str(error).splitlines()), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
