"""The ``clip-decoder`` command's arguments: one ``add_<command>`` per subcommand, declared only for the
command being run (so ``predict`` imports no training code); the training, prior, head and service
options are generated from ``TrainConfig``, ``PriorConfig``, ``HeadConfig`` and ``Limits``, where
each is declared once."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields

from . import __version__
from .configs import HeadConfig, PriorConfig
from .model_folder import PACKAGED_MODELS

HEAD_OPTIONS = tuple(item for item in fields(HeadConfig) if item.default is not MISSING)  # not the towers' dims
PRIOR_OPTIONS = tuple(item for item in fields(PriorConfig) if "help" in item.metadata)  # --prior-<name>


def add_config_options(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> dict:
    """One option per TrainConfig field, PriorConfig and HeadConfig option, with their defaults and help;
    returns the argument groups by name."""
    from .training.config import TrainConfig
    from .training.methods import decoder_method, decoder_methods

    groups: dict[str, argparse._ArgumentGroup] = {}
    for item in fields(TrainConfig):
        if "help" not in item.metadata or item.name in exclude:
            continue
        metadata = dict(item.metadata)
        group = groups.setdefault(metadata["group"], parser.add_argument_group(metadata.pop("group")))
        flag, help_text = "--" + item.name.replace("_", "-"), metadata.pop("help")
        if item.name == "method":
            metadata["choices"] = decoder_methods()
        if item.name == "epochs":
            help_text += " (" + ", ".join(f"{name} {decoder_method(name).epochs}" for name in decoder_methods()) + ")"
        if isinstance(item.default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=item.default, help=help_text)
            continue
        if item.default is not None:
            metadata.setdefault("type", type(item.default))
            help_text += " (default %(default)s)"
        group.add_argument(flag, default=item.default, help=help_text, **metadata)
    add_prior_options(parser.add_argument_group("prior", "how the zero-shot prior enters the trained model's scores"
                                                " (methods that use it; predict and serve can change it)"), defaults=True)
    head = parser.add_argument_group("head", "HeadConfig options; a method may fix some (ml-decoder: no cosine skip)")
    for item in HEAD_OPTIONS:
        flag, help_text = "--" + item.name.replace("_", "-"), f"{item.metadata['help']} (default {item.default})"
        if isinstance(item.default, bool):
            head.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            head.add_argument(flag, type=type(item.default), help=help_text)
    return groups


def checked_number(holds, words: str):
    """An argparse type: a float for which ``holds`` is true, else an error saying it must be ``words``."""
    def number(text: str) -> float:
        value = float(text)
        if not holds(value):
            raise argparse.ArgumentTypeError(f"must be {words}, got {text}")
        return value
    return number


at_least_zero = checked_number(lambda value: value >= 0, "at least 0")
above_zero = checked_number(lambda value: value > 0, "above 0")
share = checked_number(lambda value: 0 <= value <= 1, "between 0 and 1")


PRIOR_OPTION_TYPES = {"temperature": (above_zero, "T"), "centring": (share, "SHARE"),
                      "head_only_margin": (at_least_zero, "AP")}  # the others: weights


def add_prior_options(parser, defaults: bool, names: tuple[str, ...] | None = None) -> None:
    """``--prior-<name>`` for PriorConfig's options (or those ``names``); without ``defaults`` they default to
    None: the model's own setting."""
    for item in PRIOR_OPTIONS:
        if names is None or item.name in names:
            shown = f" (default {item.default})" if defaults else " (default: the model's own)"
            kind, metavar = PRIOR_OPTION_TYPES.get(item.name, (at_least_zero, "W"))
            parser.add_argument(f"--prior-{item.name.replace('_', '-')}", dest=f"prior_{item.name}", type=kind,
                                metavar=metavar, default=item.default if defaults else None,
                                help=item.metadata["help"] + shown)


def prior_changes(args: argparse.Namespace) -> dict:
    """The PriorConfig settings given as --prior-<name> options (those left out: not in the dict)."""
    return {item.name: getattr(args, f"prior_{item.name}") for item in PRIOR_OPTIONS
            if getattr(args, f"prior_{item.name}", None) is not None}


def training_config(args: argparse.Namespace, **fixed):
    """The TrainConfig of the parsed options; ``fixed`` sets the fields that were not options."""
    from .training.config import TrainConfig

    values = {item.name: getattr(args, item.name) for item in fields(TrainConfig) if hasattr(args, item.name)}
    head = {item.name: getattr(args, item.name) for item in HEAD_OPTIONS if getattr(args, item.name) is not None}
    return TrainConfig(**{**values, **fixed}, head=head, prior=PriorConfig(**prior_changes(args)))


def add_model_option(parser: argparse.ArgumentParser, packaged: bool = False, tower_alone: bool = False) -> None:
    """--model (``packaged``: default the packaged model); ``tower_alone`` (predict, serve): or --backbone."""
    if packaged:
        which = parser.add_mutually_exclusive_group() if tower_alone else parser
        which.add_argument("--model", metavar="DIR", default=PACKAGED_MODELS[0],
                           help=f"a model folder, or a packaged model's name (default {PACKAGED_MODELS[0]}: the offline"
                           " towers with a head trained on the whole OpenClipart benchmark)")
        if tower_alone:
            which.add_argument("--backbone", metavar="NAME", help="no trained head: tag with this tower's own zero-shot"
                               " view (hf:<hub id or folder> of a CLIP or SigLIP model; README, Zero-shot with a tower"
                               " alone)")
    else:
        parser.add_argument("--model", metavar="DIR", required=True,
                            help="a model folder written by train or save_pretrained, or a packaged model's name")


def add_runtime_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runtime", choices=("torch", "onnx"), default="torch",
                        help="torch (default): --model is a model folder; onnx: a folder `clip-decoder export` wrote,"
                        " run by ONNX Runtime without torch or transformers (same options and outputs; no --shortlist)")


def add_export(export: argparse.ArgumentParser) -> None:
    """clip-decoder export"""
    export.description = ("Write a model as ONNX graphs, to run without torch: image.onnx (pixels -> tokens, prior), "
                          "text.onnx and tokenizer.json (new labels), scoring.onnx (any images x labels -> "
                          "probabilities), attention.onnx (heatmaps) and manifest.json, each graph checked against "
                          "torch. Run it: `clip-decoder predict --runtime onnx --model OUT ...` (README).")
    add_model_option(export, packaged=True)
    export.add_argument("--out", required=True, metavar="DIR",
                        help="folder to write (new, empty, or an earlier export, which is replaced)")


def add_backbone_option(parser) -> None:
    """--backbone on ``parser`` (a parser, or a group of one)."""
    parser.add_argument("--backbone", default="offline", help="backbone name (default offline; or hf:<id or folder>)")


def add_feature_options(parser: argparse.ArgumentParser, reads: str) -> None:
    """--cache and --store: where the frozen tower's features are kept (``feature_location``)."""
    parser.add_argument("--cache", metavar="DIR", help="feature cache folder (default ~/.cache/clip-decoder)")
    parser.add_argument("--store", metavar="DIR", help="keep the frozen tower's features in a sharded feature store in"
                        f" DIR instead of the per-image cache, and {reads}: memory no longer grows with the number of"
                        " images (README, Scaling out). Extraction into it resumes where it stopped; under torchrun"
                        " the processes split it")


def feature_location(args: argparse.Namespace):
    """Where --cache / --store say the features are kept."""
    from .features import FeatureLocation

    return FeatureLocation(cache=args.cache, store=args.store)


def add_zsl_images_option(parser: argparse.ArgumentParser) -> None:
    from .metrics import ZSL_IMAGES

    default = next(iter(ZSL_IMAGES))
    parser.add_argument("--zsl-images", choices=list(ZSL_IMAGES), default=default,
                        help="the images ZSL ranks the unseen labels on: " + "; ".join(
                            f"{name}: {text}" for name, text in ZSL_IMAGES.items())
                        + f" (default {default}). GZSL always uses every test image")


def add_predict(predict: argparse.ArgumentParser) -> None:
    """clip-decoder predict"""
    from .library import add_out_options
    from .prompts import TEMPLATE_SETS
    from .thresholds import NEW_LABEL_THRESHOLD
    from .writers import FORMATS

    predict.description = ("Score every label for each image. Images: files, folders (searched recursively), glob "
                            "patterns (quote them: 'photos/**/*.jpg') or --images-from FILE. Output (stdout): one "
                            "JSON line per image, {'image': path, 'scores': {label: probability}, 'labels': [the "
                            "labels decided yes]}; or CSV, or a readable table. With no decision option the model's "
                            "own rule decides: its trained labels at the threshold its training chose on validation "
                            f"images, every other label at {NEW_LABEL_THRESHOLD}. Bad images are reported on stderr "
                            "and skipped; the exit status is 1 if any failed, 2 for a usage error.")
    add_model_option(predict, packaged=True, tower_alone=True)
    add_runtime_option(predict)
    labels = predict.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", help="comma-separated label names")
    labels.add_argument("--labels-file", metavar="FILE", help="a text file with one label per line")
    predict.add_argument("--templates", choices=["model", *TEMPLATE_SETS], default="model",
                         help="prompt templates: the model's own (default), or a named set")
    predict.add_argument("--format", choices=FORMATS, default="jsonl",
                         help="jsonl (default: one JSON object per image), csv (a column per label) or table (readable)")
    predict.add_argument("--top-k", type=int, metavar="K", help="decide: keep each image's K best labels")
    predict.add_argument("--threshold", type=float, metavar="T",
                         help="decide: keep labels scoring at least T; with --thresholds or --calibrated, the labels"
                         " without a threshold of their own")
    decide = predict.add_mutually_exclusive_group()
    decide.add_argument("--thresholds", metavar="FILE",
                        help="decide: per-label thresholds, a JSON object {label: T} (other labels:"
                        " --threshold, else the model's rule) or a thresholds.json written by calibrate")
    decide.add_argument("--calibrated", action="store_true",
                        help="decide: the thresholds `clip-decoder calibrate` stored with the model (labels it was"
                        " not trained on: the table's new-label threshold)")
    add_prior_options(predict, defaults=False, names=("weight", "seen_weight", "confidence_weight"))
    predict.add_argument("--batch-size", type=int, default=8,
                         help="images per forward pass (default 8: fastest on CPU; a GPU wants more, e.g. 64)")
    predict.add_argument("--shortlist", type=int, metavar="K",
                         help="approximate, for large vocabularies: decode only each image's K most likely labels"
                         " (ranked by the alignment space); the others score below them (default: off, exact)")
    predict.add_argument("--images-from", metavar="FILE", help="also read image paths from FILE, one per line")
    predict.add_argument("--heatmaps", metavar="DIR",
                         help="write a PNG per image and decided label showing where"
                         " the label's cross-attention looked, over the image as the tower saw it")
    add_out_options(predict)  # --out, --out-format, --part-size
    predict.add_argument("images", nargs="*", metavar="IMAGE_FOLDER_OR_GLOB")


def add_train(train: argparse.ArgumentParser) -> None:
    """clip-decoder train"""
    from .training.loop import CHECKPOINT_EVERY

    train.description = ("Train the CLIP-Decoder head on frozen-tower features (seen labels only; or end to end with"
                          " --finetune-image-tower) and write a model folder with train_log.jsonl, training.json and "
                          "curves.png. The run's state is checkpointed in OUT/checkpoint.safetensors until it ends; "
                          "--resume continues from it. Under `torchrun --nproc_per_node N -m clip_decoder train ...` "
                          "the same arguments train on N processes (see README, Scaling out).")
    train.add_argument("--data", required=True, metavar="DIR", help="dataset folder (train.csv, test.csv)")
    train.add_argument("--split", required=True, metavar="JSON", help='label split {"seen": [...], "unseen": [...]}')
    train.add_argument("--out", required=True, metavar="DIR", help="model folder to write")
    add_backbone_option(train)
    add_feature_options(train, "read each batch's rows from it")
    groups = add_config_options(train)
    groups["long runs"].add_argument(
        "--resume", action="store_true", help="continue from OUT/checkpoint.safetensors (same options), e.g. after"
        " the process was killed; the result equals an uninterrupted run's")
    groups["long runs"].add_argument(
        "--checkpoint-every", type=int, default=CHECKPOINT_EVERY, metavar="STEPS",
        help="optimizer steps between checkpoints, besides one after each epoch (default %(default)s)")


def add_calibrate(calibrate: argparse.ArgumentParser) -> None:
    """clip-decoder calibrate"""
    calibrate.description = ("Choose each seen label's threshold (best F1 on the validation images, labels with at "
                             "least 5 positives) and a default for every other label (best micro-F1 over all "
                             "validation labels); report what they achieve on the test part; write "
                             "MODEL/thresholds.json for `predict --calibrated`.")
    add_model_option(calibrate)
    calibrate.add_argument("--data", required=True, metavar="DIR", help="dataset folder: val.csv or a part carved from train.csv, and test.csv")
    calibrate.add_argument("--split", required=True, metavar="JSON", help="label split: thresholds are chosen for its seen labels")
    calibrate.add_argument("--val-fraction", type=float, default=0.1,
                           help="with no val.csv: the part of train.csv carved out for validation, as in train (default 0.1)")
    add_feature_options(calibrate, "read the images' rows from it")


def add_serve(serve: argparse.ArgumentParser) -> None:
    """clip-decoder serve"""
    serve.description = ("Serve one model over HTTP: POST /v1/predict (multipart: 'images' files, 'labels'), GET "
                         "/health, OpenAPI docs at /docs, and a web page at /. Each request's body, uploads, images, "
                         "pixels, labels and time are bounded, and so is the queue for the model; an excess is "
                         "answered with a 4xx naming the limit.")
    add_model_option(serve, packaged=True, tower_alone=True)
    add_runtime_option(serve)
    serve.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="default 8000")

    add_prior_options(serve, defaults=False, names=("weight", "seen_weight", "confidence_weight"))
    from .serve.limits import add_limit_options

    add_limit_options(serve.add_argument_group("limits", "answered with a 4xx naming the limit; the service reports them"
                                               " at /health"))


def add_evaluate(evaluate: argparse.ArgumentParser) -> None:
    """clip-decoder evaluate"""
    evaluate.description = ("Score the test part's images for all labels of the split and print mAP and P/R/F1 at "
                            "top-3 and top-5 (percent), ZSL and GZSL.")
    add_model_option(evaluate)
    evaluate.add_argument("--data", required=True, metavar="DIR")
    evaluate.add_argument("--split", required=True, metavar="JSON")
    evaluate.add_argument("--json", metavar="PATH", help="write the metrics JSON here")
    add_zsl_images_option(evaluate)
    add_feature_options(evaluate, "score it a few hundred images at a time into a memory-mapped score matrix")


def add_extract(extract: argparse.ArgumentParser) -> None:
    """clip-decoder extract"""
    extract.description = ("Run the images of the dataset folder (train, val if present, test) through the frozen "
                           "image tower into the sharded feature store in --store, for `train --store` and `evaluate "
                           "--store`. Images already stored are skipped, so an interrupted extraction resumes. Under "
                           "`torchrun --nproc_per_node N -m clip_decoder extract ...` the N processes split the "
                           "images (README, Scaling out).")
    extract.add_argument("--data", required=True, metavar="DIR", help="dataset folder (train.csv, test.csv)")
    extract.add_argument("--store", required=True, metavar="DIR", help="feature store folder (created if missing)")
    extract.add_argument("--parts", nargs="+", choices=("train", "val", "test"), default=["train", "val", "test"],
                         help="which parts to extract (default: all; val only where the folder has val.csv)")
    extract.add_argument("--batch-size", type=int, default=8,
                         help="images per forward pass (default 8: fastest on CPU; a GPU wants more, e.g. 64)")
    tower = extract.add_mutually_exclusive_group()
    add_backbone_option(tower)
    tower.add_argument("--model", metavar="DIR", help="a model folder: its image tower (e.g. a fine-tuned one)")


def add_data(data: argparse.ArgumentParser) -> None:
    """clip-decoder data (builders and converters)"""
    builders = data.add_subparsers(dest="builder", required=True, metavar="DATASET")
    openclipart = builders.add_parser(
        "openclipart", help="multi-label clip art from Debian's openclipart-svg",
        description="Render Debian's openclipart-svg to PNG, clean the SVGs' tags into labels, split 70/30 and"
        " write a dataset folder with two seen/unseen label splits (see docs/DATASET.md).")
    openclipart.add_argument("--out", required=True, metavar="DIR")
    openclipart.add_argument("--source", metavar="DIR", help="an extracted openclipart svg folder"
                             " (default /usr/share/openclipart/svg, from Debian's openclipart-svg package:"
                             " `make system-packages`)")
    openclipart.add_argument("--image-size", type=int, default=256, help="longest side of the PNGs (default 256)")
    openclipart.add_argument("--min-images", type=int, default=15, help="keep labels with at least this many images (default 15)")

    coco = builders.add_parser(
        "coco", help="convert COCO instances JSON (labels: the categories annotated in each image)",
        description="Write OUT/train.csv and test.csv (image paths relative to OUT; the images stay where they are)"
        " and OUT/split.json from COCO instances files, e.g. instances_train2017.json and instances_val2017.json.")
    coco.add_argument("--train-json", required=True, metavar="FILE")
    coco.add_argument("--train-images", required=True, metavar="DIR", help="folder of the training images (train2017/)")
    coco.add_argument("--test-json", required=True, metavar="FILE")
    coco.add_argument("--test-images", required=True, metavar="DIR", help="folder of the test images (val2017/)")
    coco.add_argument("--split", default="48/17", metavar="NAME_OR_JSON",
                      help="label split: 48/17 (the open-vocabulary split, default), a split JSON file, or none")
    coco.add_argument("--out", required=True, metavar="DIR")

    nuswide = builders.add_parser(
        "nuswide", help="convert NUS-WIDE as distributed (image lists, 1k tags, 81 concept labels)",
        description="Write OUT/train.csv, test.csv and split.json for the NUS-WIDE zero-shot protocol: training"
        " images labelled with their tags minus the 81 concepts (925 seen labels), test images with those tags"
        " plus their 81-concept ground truth (the unseen labels).")
    nuswide.add_argument("--root", required=True, metavar="DIR",
                         help="folder holding ImageList/, NUS_WID_Tags/, Groundtruth/ and Concepts81.txt")
    nuswide.add_argument("--images", metavar="DIR", help="the Flickr image folder (default ROOT/Flickr)")
    nuswide.add_argument("--out", required=True, metavar="DIR")

    nuswide_csv = builders.add_parser(
        "nuswide-csv", help="convert the single-CSV NUS-WIDE form ML-Decoder's users have",
        description="Read a CSV of image path, label list and split (train / val; val is the test part) and write"
        " OUT/train.csv, test.csv and split.json (unseen: the 81 concepts, unless --split is given).")
    nuswide_csv.add_argument("--csv", required=True, metavar="FILE")
    nuswide_csv.add_argument("--images", metavar="DIR", help="folder the CSV's image paths are relative to"
                             " (default: the CSV's folder)")
    nuswide_csv.add_argument("--split", metavar="JSON", help="a label split JSON (default: the 81 concepts unseen)")
    nuswide_csv.add_argument("--out", required=True, metavar="DIR")


def add_bench(bench: argparse.ArgumentParser) -> None:
    """clip-decoder bench"""
    from .training.methods import get_method, method_names

    bench.description = ("Train and evaluate each method for each seed and label split on one dataset folder; print"
                         " mean ± std of the ZSL / GZSL metrics (each run's ZSL also on the other image set).")
    bench.add_argument("--data", required=True, metavar="DIR")
    bench.add_argument("--splits", required=True, nargs="+", metavar="JSON")
    bench.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    bench.add_argument("--methods", nargs="+", choices=method_names(), default=list(method_names(ablations=False)),
                       help="default: all but the ablations. " + "; ".join(f"{name}: {get_method(name).summary}"
                                                                            for name in method_names()))
    bench.add_argument("--photos", metavar="DIR", help="also rank a photo check with each trained model: DIR/photos.csv"
                       " (image,labels) and DIR/vocabulary.txt (one label a line); `python -m bench.photos` builds one")
    add_zsl_images_option(bench)
    bench.add_argument("--json", metavar="PATH", help="write every run's metrics here (with ZSL on each image set)")
    bench.add_argument("--markdown", metavar="PATH", help="write the tables as a markdown page (e.g. docs/RESULTS.md)")
    bench.add_argument("--save-models", metavar="DIR", help="write each trained decoder model to"
                       " DIR/<split>-<method>-seed<N> (a model folder, for predict and evaluate)")
    bench.add_argument("--jobs", type=int, default=1, metavar="N", help="run the (split, seed) pairs in N processes, sharing the"
                       " torch threads (default 1; fewer threads round otherwise, so results move within the seeds' spread)")
    add_backbone_option(bench)
    add_feature_options(bench, "read the images' rows from it")
    # The harness trains heads on cached features: no fine-tuning of the tower here.
    add_config_options(bench, exclude=("method", "seed", "finetune_image_tower", "tower_lr", "tower_blocks"))


COMMANDS = {  # name -> (one line of help, what declares its options)
    "predict": ("score labels for images", add_predict),
    "export": ("write a model as ONNX graphs, to run without torch", add_export),
    "train": ("train on the seen labels of a dataset folder", add_train),
    "calibrate": ("choose per-label decision thresholds and store them with the model", add_calibrate),
    "serve": ("HTTP API (POST /v1/predict, GET /health) and a web page at /", add_serve),
    "evaluate": ("ZSL / GZSL metrics of a model on a test set", add_evaluate),
    "extract": ("extract a dataset folder's image features into a feature store", add_extract),
    "data": ("build benchmark datasets, or convert COCO / NUS-WIDE to dataset folders", add_data),
    "bench": ("CLIP-Decoder against the baselines, seeds x label splits", add_bench),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or with ``command`` one whose other commands are declared without their options
    (``""``: no command's options, for the top-level --help)."""
    parser = argparse.ArgumentParser(
        prog="clip-decoder",
        description="Zero-shot multi-label image classification: a probability for any label name.",
    )
    parser.add_argument("--version", action="version", version=f"clip-decoder {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (summary, add) in COMMANDS.items():
        subparser = commands.add_parser(name, help=summary)
        if command in (None, name):
            add(subparser)
    return parser
