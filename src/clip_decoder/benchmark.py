"""The zero-shot benchmark harness: CLIP-Decoder and the baselines, seeds x label splits.

Features are extracted once (feature cache) and shared by every method, seed and split; each
method sees only the seen labels of a split until the test set is scored.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import fields, replace
from pathlib import Path

import torch

from .baselines import CONSE_TOP, LINEAR_EPOCHS, ConSE, LinearMap, imagenet_class_names
from .data.folder import LabelSplit, read_part, read_split, training_parts
from .encoders import Backbone
from .evaluate import score_tokens
from .features import FeatureCache
from .head import HeadConfig
from .metrics import zsl_gzsl_metrics
from .model import CLIPDecoder
from .prompts import TEMPLATE_SETS
from .train import METHODS as TRAINED_METHODS
from .train import FeatureSet, TrainConfig, fit

METHODS = ("clip-decoder", "ml-decoder", "linear", "conse")
SUMMARY_COLUMNS = (("zsl", "mAP"), ("zsl", "F1@3"), ("zsl", "F1@5"), ("gzsl", "mAP"), ("gzsl", "F1@3"), ("gzsl", "F1@5"))


def run_method(method: str, model: CLIPDecoder, parts: dict[str, FeatureSet], split: LabelSplit,
               config: TrainConfig, progress: bool) -> dict:
    """Train ``method`` on the seen labels (a fresh head per call), then the metrics JSON on test."""
    templates = TEMPLATE_SETS[config.templates]
    train, val, test = parts["train"], parts["val"], parts["test"]
    if method in TRAINED_METHODS:
        fit(model, train, val, split.seen, replace(config, method=method), progress=progress)
        scores = score_tokens(model.head, test.tokens, model.embed_labels(list(split.all), templates))
    elif method == "linear":
        torch.manual_seed(config.seed)
        linear = LinearMap(train.pooled.shape[1], model.text_tower.dim)
        linear.fit(train.pooled, train.targets(split.seen), model.embed_labels(list(split.seen), templates), config.seed)
        scores = linear.score(test.pooled, model.embed_labels(list(split.all), templates))
    elif method == "conse":
        conse = ConSE(model.image_tower, model.embed_labels(imagenet_class_names(), templates))
        scores = conse.score(test.pooled, model.embed_labels(list(split.all), templates))
    else:
        raise ValueError(f"unknown method {method!r}")
    return zsl_gzsl_metrics(scores, test.targets(split.all).numpy(), list(split.all), list(split.unseen))


def fresh_model(towers: CLIPDecoder, config: TrainConfig, method: str = "clip-decoder") -> CLIPDecoder:
    """A new, seeded head for ``method`` on the already loaded towers of ``towers``."""
    torch.manual_seed(config.seed)
    options = replace(config, method=method).head_options if method in TRAINED_METHODS else config.head
    head = replace(towers.config.head, **options)
    model_config = replace(towers.config, head=head, templates=TEMPLATE_SETS[config.templates])
    return CLIPDecoder(model_config, Backbone(towers.config.backbone, towers.image_tower, towers.text_tower))


def run_benchmark(data_dir: str | Path, split_paths: list[Path], seeds=(0, 1, 2), methods=METHODS,
                  backbone: str = "offline", config: TrainConfig | None = None, cache_dir=None,
                  progress: bool = True) -> dict:
    """results[split name][method] = list of metrics JSON, one per seed (CONSE: one, it has no seed)."""
    config = config or TrainConfig()
    towers = CLIPDecoder.create(backbone=backbone)
    cache = FeatureCache(towers.image_tower, cache_dir)
    train_samples, val_samples = training_parts(data_dir, config.val_fraction)
    samples = {"train": train_samples, "val": val_samples, "test": read_part(data_dir, "test")}
    parts = {name: FeatureSet.build(items, cache, progress) for name, items in samples.items()}
    results: dict[str, dict[str, list[dict]]] = {}
    for split_path in split_paths:
        split = read_split(split_path)
        results[Path(split_path).stem] = per_method = {}
        for method in methods:
            for seed in seeds if method != "conse" else seeds[:1]:
                started = time.perf_counter()
                model = fresh_model(towers, replace(config, seed=seed), method)
                metrics = run_method(method, model, parts, split, replace(config, seed=seed), progress=False)
                metrics["seconds"] = round(time.perf_counter() - started, 1)
                per_method.setdefault(method, []).append(metrics)
                if progress:
                    print(f"{Path(split_path).stem} {method} seed {seed}: ZSL mAP {metrics['zsl']['mAP']:.1f},"
                          f" GZSL mAP {metrics['gzsl']['mAP']:.1f} ({metrics['seconds']} s)", flush=True)
    return results


def summary_table(per_method: dict[str, list[dict]]) -> str:
    """Markdown: mean ± standard deviation over seeds of the headline metrics, per method."""
    header = "| method | runs | " + " | ".join(f"{p.upper()} {c}" for p, c in SUMMARY_COLUMNS) + " |"
    lines = [header, "|---|---|" + "---|" * len(SUMMARY_COLUMNS)]
    for method, runs in per_method.items():
        cells = []
        for part, column in SUMMARY_COLUMNS:
            values = [run[part][column] for run in runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.1f} ± {spread:.1f}")
        lines.append(f"| {method} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)



def method_recipe(method: str, config: TrainConfig) -> str:
    """One line saying what ``method`` trains and how, for the results page."""
    if method in TRAINED_METHODS:
        method_config = replace(config, method=method)
        head = {**{f.name: f.default for f in fields(HeadConfig)}, **method_config.head_options}
        skip = "with" if head["cosine_skip"] else "without"
        loss = "ASL" + (f" + {method_config.loss_weights.clip} x alignment" if method_config.loss_weights.clip else "")
        return (f"head d {head['dim']}, FFN {head['ffn_dim']}, dropout {head['dropout']}, {skip} cosine skip;"
                f" {loss}; {method_config.num_epochs} epochs, batch {config.batch_size}, lr {config.lr},"
                f" weight decay {config.weight_decay}, EMA {config.ema_decay}; {config.templates} prompts")
    if method == "linear":
        return (f"linear map pooled image -> text space, cosine x learned scale, ASL, {LINEAR_EPOCHS} epochs;"
                f" {config.templates} prompts")
    if method == "conse":
        return (f"the image tower's ImageNet classifier, top-{CONSE_TOP} class names' text embeddings;"
                f" {config.templates} prompts")
    raise ValueError(f"unknown method {method!r}")


def results_markdown(results: dict, data_dir: str | Path, command: str, seconds: float,
                     config: TrainConfig | None = None) -> str:
    """docs/RESULTS.md: what was run, on what, and the table per label split."""
    import json
    import platform

    stats_path = Path(data_dir) / "stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
    lines = [
        "# Results: zero-shot multi-label tagging",
        "",
        f"Written by `{command}` ({platform.machine()}, {torch.get_num_threads()} torch threads, torch"
        f" {torch.__version__}; {seconds / 60:.1f} min for all runs, feature extraction included).",
        "Each method trains on the seen labels of a split only; the test images and unseen labels are"
        " touched only for the scores below. Mean ± standard deviation over seeds; CONSE has no seed."
        " ZSL: test images with an unseen label, ranking the unseen labels; GZSL: all test images,"
        " all labels. Percent.",
    ]
    config = config or TrainConfig()
    methods = dict.fromkeys(method for per_method in results.values() for method in per_method)
    lines += ["", "Methods:", "", *(f"- **{method}**: {method_recipe(method, config)}." for method in methods)]
    if stats:
        lines += ["", "Dataset: " + ", ".join(f"{k} {v}" for k, v in stats.items() if not isinstance(v, (dict, list))) + "."]
    for name, per_method in results.items():
        lines += ["", f"## Label split `{name}`", "", summary_table(per_method)]
    return "\n".join(lines) + "\n"
