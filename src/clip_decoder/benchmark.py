"""The zero-shot benchmark harness: registered methods x seeds x label splits, and its results page.

Features are extracted once (the feature cache, or a feature store) and shared by every method, seed
and split; each method sees only the seen labels of a split until the test set is scored.
"""

from __future__ import annotations

import json
import multiprocessing
import platform
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .allocator import keep_freed_memory
from .data.folder import read_part, read_split, training_parts
from .encoders import create_backbone
from .errors import ClipDecoderError
from .features import FeatureLocation, FeatureSource
from .metrics import (ZSL_IMAGES, check_zsl_images, micro_prf, per_image_metrics, top_k_mask, zsl_by_images,
                      zsl_gzsl_metrics)
from .prompts import TEMPLATE_SETS, check_labels
from .thresholds import Thresholds
from .training.config import TrainConfig
from .training.data import FeatureSet
from .training.methods import DecoderMethod, MethodRun, embed_class_names, get_method, method_names

PHOTOS_PART, VOCABULARY_FILE = "photos", "vocabulary.txt"


@dataclass
class PhotoCheck:
    """Labelled images outside the benchmark, each ranked against one free vocabulary."""

    features: FeatureSet
    labels: tuple[str, ...]

    @classmethod
    def load(cls, folder: str | Path, source: FeatureSource, progress: bool = True) -> PhotoCheck:
        """``folder/photos.csv`` (image,labels, as a dataset part) and ``folder/vocabulary.txt`` (a label a line)."""
        path = Path(folder) / VOCABULARY_FILE
        try:
            labels = tuple(check_labels([line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                                         if line.strip()]))
        except OSError as error:
            raise ClipDecoderError(f"cannot read the photo vocabulary {path}: {error}") from error
        samples = read_part(folder, PHOTOS_PART)
        outside = sorted({label for sample in samples for label in sample.labels} - set(labels))
        if outside:
            raise ClipDecoderError(f"{Path(folder) / (PHOTOS_PART + '.csv')}: labels not in {path}: {', '.join(outside)}")
        return cls(FeatureSet.build(samples, source, progress), labels)

    def metrics(self, scores: np.ndarray, decision: Thresholds | None = None) -> dict:
        """``per_image_metrics`` of these scores (photos x labels) and, given a model's ``decision`` rule,
        the ``decisions`` its rule, 0.5 and each photo's top 3 make."""
        targets = self.features.targets(self.labels).numpy()
        result = per_image_metrics(scores, targets)
        if decision is not None:
            result["decisions"] = decisions(scores, targets, self.labels, decision)
        return result


SUMMARY_COLUMNS = (("zsl", "mAP"), ("zsl", "F1@3"), ("zsl", "F1@5"), ("gzsl", "mAP"), ("gzsl", "F1@3"), ("gzsl", "F1@5"))
ZSL_COLUMNS = ("mAP", "P@3", "R@3", "F1@3", "P@5", "R@5", "F1@5")  # the published NUS-WIDE tables' columns


def run_method(name: str, run: MethodRun, photos: PhotoCheck | None = None, zsl_images: str = "with-unseen") -> dict:
    """Train method ``name`` on the run's seen labels (``run.config`` gives its seed and options),
    then the metrics JSON of the test part (ZSL on the images ``zsl_images`` names), with
    ``zsl_by_images`` (ZSL on each image set), the run's ``seconds`` and, with ``photos``,
    ``per_image_metrics`` of the photo check."""
    started = time.perf_counter()
    trained = get_method(name).train(run)
    test, labels, unseen = run.parts["test"], list(run.split.all), list(run.split.unseen)
    scores, targets = trained.score(test, labels), test.targets(run.split.all).numpy()
    metrics = zsl_gzsl_metrics(scores, targets, labels, unseen, zsl_images=zsl_images)
    metrics["zsl_by_images"] = zsl_by_images(scores, targets, labels, unseen)
    if trained.decision is not None:
        columns = {"seen": [labels.index(label) for label in run.split.seen], "unseen": [labels.index(label) for label in unseen]}
        metrics["decisions"] = {part: decisions(scores[:, cols], targets[:, cols], [labels[c] for c in cols], trained.decision)
                                for part, cols in columns.items()}
    if photos is not None:
        metrics["photos"] = photos.metrics(trained.score(photos.features, list(photos.labels)), trained.decision)
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    return metrics


DECISION_RULES = ("default rule", "0.5", "top 3")  # how decisions are reported: the model's own rule against two others


def decisions(scores: np.ndarray, targets: np.ndarray, labels: Sequence[str], rule: Thresholds) -> dict:
    """Micro P/R/F1 and yes per true label (metrics.micro_prf) of each of DECISION_RULES on these images
    and labels: the model's default ``rule``, 0.5 everywhere, and each image's 3 best labels."""
    top3 = top_k_mask(scores, min(3, len(labels)))
    return {"default rule": micro_prf(scores, targets, rule.for_labels(labels)),
            "0.5": micro_prf(scores, targets, np.full(len(labels), 0.5)),
            "top 3": micro_prf(top3.astype(np.float32), targets, np.full(len(labels), 0.5))}


@dataclass(frozen=True)
class BenchmarkSetup:
    """What every run of one benchmark reads: the dataset, towers, feature location, photo check and options."""

    data_dir: str | Path
    backbone: str
    config: TrainConfig
    features: FeatureLocation
    photos: str | Path | None
    save_models: str | Path | None
    zsl_images: str


class BenchmarkRuns:
    """One process's share of a benchmark: the towers, the features of every part (extracted into the feature
    location when missing) and, shared by its runs, the heads trained so far (clip-decoder and its prior
    ablations train alike) and the towers' class-name embeddings."""

    def __init__(self, setup: BenchmarkSetup, progress: bool, lines: bool | None = None) -> None:
        """``progress``: bars while features are extracted or read; ``lines`` (default: progress): a line per run."""
        self.setup, self.lines = setup, progress if lines is None else lines
        self.towers = create_backbone(setup.backbone)
        source = setup.features.open(self.towers.image)
        self.photo_check = PhotoCheck.load(setup.photos, source, progress) if setup.photos else None
        train_samples, val_samples = training_parts(setup.data_dir, setup.config.val_fraction)
        samples = {"train": train_samples, "val": val_samples, "test": read_part(setup.data_dir, "test")}
        self.parts = {name: FeatureSet.build(items, source, progress) for name, items in samples.items()}
        self.trained, self.class_embeddings = {}, {}

    def embed_class_names(self) -> dict[tuple[str, ...], np.ndarray]:
        """The towers' ImageNet class-name embeddings through the setup's templates (empty for a tower without an
        ImageNet classifier), made now, as the runs that need them share them; for worker processes to start with."""
        if self.towers.image.zero_shot == "imagenet":
            templates = TEMPLATE_SETS[self.setup.config.templates]
            self.class_embeddings[templates] = embed_class_names(self.towers, templates)
        return {templates: embeddings.numpy() for templates, embeddings in self.class_embeddings.items()}

    def run(self, split_path: Path, seed: int, methods: Sequence[str]) -> dict[str, dict]:
        """{method: metrics} of ``methods`` trained with ``seed`` on the split at ``split_path``."""
        split, name, setup, results = read_split(split_path), Path(split_path).stem, self.setup, {}
        for method in map(get_method, methods):
            save_to = (Path(setup.save_models) / f"{name}-{method.name}-seed{seed}"
                       if setup.save_models and isinstance(method, DecoderMethod) else None)
            run = MethodRun(self.towers, self.parts, split, replace(setup.config, seed=seed), trained=self.trained,
                            class_embeddings=self.class_embeddings, save_to=save_to)
            results[method.name] = metrics = run_method(method.name, run, self.photo_check, setup.zsl_images)
            if self.lines:
                on_photos = (f", photos top-1 {metrics['photos']['top1_correct']}/{metrics['photos']['images']}"
                             f" AP {metrics['photos']['per_image_AP']:.1f}" if self.photo_check else "")
                print(f"{name} {method.name} seed {seed}: ZSL mAP {metrics['zsl']['mAP']:.1f},"
                      f" GZSL mAP {metrics['gzsl']['mAP']:.1f}{on_photos} ({metrics['seconds']} s)", flush=True)
        return results


_WORKER_RUNS: BenchmarkRuns | None = None  # a worker process's BenchmarkRuns, made once by _start_worker


def _start_worker(setup: BenchmarkSetup, threads: int, lines: bool, class_embeddings: dict) -> None:
    global _WORKER_RUNS
    torch.set_num_threads(threads)
    _WORKER_RUNS = BenchmarkRuns(setup, progress=False, lines=lines)  # no bars from several processes at once
    for templates, array in class_embeddings.items():  # the main process's (BenchmarkRuns.embed_class_names)
        _WORKER_RUNS.class_embeddings[templates] = torch.from_numpy(array)


def _worker_run(split_path: Path, seed: int, methods: Sequence[str]) -> dict[str, dict]:
    return _WORKER_RUNS.run(split_path, seed, methods)


def run_benchmark(data_dir: str | Path, split_paths: list[Path], seeds=(0, 1, 2), methods=None,
                  backbone: str = "offline", config: TrainConfig = TrainConfig(),
                  features: FeatureLocation = FeatureLocation(), progress: bool = True, photos: str | Path | None = None,
                  save_models: str | Path | None = None, zsl_images: str = "with-unseen", jobs: int = 1) -> dict:
    """results[split name][method] = list of metrics JSON, one per seed (one in all for unseeded
    methods); ``photos``: a photo-check folder (``PhotoCheck``) every trained method also ranks;
    ``save_models``: a folder for every decoder model, ``<split>-<method>-seed<seed>``;
    ``zsl_images``: the image set of each run's ``zsl`` (metrics.ZSL_IMAGES).

    ``jobs`` > 1 runs the (split, seed) pairs in that many worker processes (at most one per pair), sharing this
    process's torch threads; features are extracted here first (and the ImageNet class names embedded, when a
    method uses the towers' zero-shot view), and each worker reads them. Fewer threads round otherwise, and
    training carries that on: the results move within the seeds' spread, not more. This process then trains
    nothing, so it sets glibc's malloc as `extract` does (allocator.keep_freed_memory); the workers keep glibc's
    defaults.
    """
    zsl_images = check_zsl_images(zsl_images, "run_benchmark")
    if jobs < 1:
        raise ClipDecoderError(f"jobs must be at least 1, got {jobs}")
    names = [get_method(name).name for name in (methods or method_names(ablations=False))]
    setup = BenchmarkSetup(data_dir, backbone, config, features, photos, save_models, zsl_images)
    # One task per (split, seed): its seeded methods, and on the first seed the unseeded ones.
    tasks = [(Path(path), seed, [name for name in names if get_method(name).seeded or seed == seeds[0]])
             for path in split_paths for seed in seeds]
    jobs = max(1, min(jobs, len(tasks)))
    if jobs > 1:
        keep_freed_memory()
    runs = BenchmarkRuns(setup, progress)  # extracts what is missing, once, before any worker starts
    if jobs == 1:
        done = [runs.run(*task) for task in tasks]
    else:
        uses_zero_shot = any(get_method(name).uses_zero_shot(config) for name in names)
        class_embeddings = runs.embed_class_names() if uses_zero_shot else {}
        del runs
        threads = max(1, torch.get_num_threads() // jobs)
        context = multiprocessing.get_context("spawn")  # a fork would copy torch's thread pool mid-state
        with ProcessPoolExecutor(jobs, context, initializer=_start_worker,
                                 initargs=(setup, threads, progress, class_embeddings)) as pool:
            done = list(pool.map(_worker_run, *zip(*tasks)))
    results: dict[str, dict[str, list[dict]]] = {}
    for (path, _, _), metrics in zip(tasks, done):
        per_method = results.setdefault(path.stem, {name: [] for name in names})
        for name, run in metrics.items():
            per_method[name].append(run)
    return results


def mean_and_spread(values: list[float]) -> str:
    """'mean ± standard deviation' over seeds (0 spread for a single run)."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {spread:.1f}"


def summary_table(per_method: dict[str, list[dict]]) -> str:
    """Markdown: mean ± standard deviation over seeds of the headline metrics, per method."""
    header = "| method | runs | " + " | ".join(f"{p.upper()} {c}" for p, c in SUMMARY_COLUMNS) + " |"
    lines = [header, "|---|---|" + "---|" * len(SUMMARY_COLUMNS)]
    for method, runs in per_method.items():
        cells = [mean_and_spread([run[part][column] for run in runs]) for part, column in SUMMARY_COLUMNS]
        lines.append(f"| {method} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def zsl_table(per_method: dict[str, list[dict]], zsl_images: str) -> str:
    """Markdown: mean ± standard deviation over seeds of the ZSL metrics on the images ``zsl_images`` names."""
    lines = ["| method | runs | " + " | ".join(f"ZSL {c}" for c in ZSL_COLUMNS) + " |",
             "|---|---|" + "---|" * len(ZSL_COLUMNS)]
    for method, runs in per_method.items():
        cells = [mean_and_spread([run["zsl_by_images"][zsl_images][column] for run in runs]) for column in ZSL_COLUMNS]
        lines.append(f"| {method} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def other_zsl_images(zsl_images: str) -> str:
    """The image set that the ``zsl`` of a run on ``zsl_images`` does not use: its second ZSL table's."""
    return next(name for name in ZSL_IMAGES if name != zsl_images)


def zsl_section(per_method: dict[str, list[dict]], zsl_images: str) -> str:
    """The second ZSL table, on the image set the first one does not use, with a line saying which."""
    other = other_zsl_images(zsl_images)
    return f"ZSL with `--zsl-images {other}`: {ZSL_IMAGES[other]}.\n\n{zsl_table(per_method, other)}"


def decision_cells(runs: list[dict]) -> list[str]:
    """Mean ± spread of decision F1 under each of DECISION_RULES and the default rule's yes per true label,
    from each run's ``decisions`` part (dashes for a method without a decision rule)."""
    if runs[0] is None:
        return ["–"] * (len(DECISION_RULES) + 1)
    cells = [mean_and_spread([run[rule]["F1"] for run in runs]) for rule in DECISION_RULES]
    spread = statistics.stdev([run["default rule"]["yes_per_true"] for run in runs]) if len(runs) > 1 else 0.0
    return [cells[0], f"{statistics.mean(run['default rule']['yes_per_true'] for run in runs):.2f} ± {spread:.2f}", *cells[1:]]


DECISION_HEADER = "decision F1, default rule | yes per true label | F1 at 0.5 | F1 of the top 3"


def decisions_table(per_method: dict[str, list[dict]]) -> str:
    """Markdown: decision F1 (micro over test image-label pairs) of the seen and of the unseen labels, over
    every test image, for each rule of DECISION_RULES; the default rule's yes per true label."""
    header = " | ".join(f"{part}: {column}" for part in ("seen", "unseen") for column in DECISION_HEADER.split(" | "))
    lines = [f"| method | runs | {header} |", "|---|---|" + "---|" * 8]
    for method, runs in per_method.items():
        if "decisions" in runs[0]:
            cells = [cell for part in ("seen", "unseen") for cell in decision_cells([run["decisions"][part] for run in runs])]
            lines.append(f"| {method} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def photos_table(per_method: dict[str, list[dict]]) -> str:
    """Markdown: each method's photo check, mean ± standard deviation over seeds: ranking and decisions."""
    lines = [f"| method | runs | top-1 correct | per-image AP | {DECISION_HEADER} |", "|---|---|---|---|" + "---|" * 4]
    for method, runs in per_method.items():
        if "photos" not in runs[0]:
            continue
        cells = [mean_and_spread([run["photos"][key] for run in runs]) for key in ("top1_correct", "per_image_AP")]
        decided = decision_cells([run["photos"].get("decisions") for run in runs])
        lines.append(f"| {method} | {len(runs)} | {cells[0]} of {runs[0]['photos']['images']} | {cells[1]} | "
                     + " | ".join(decided) + " |")
    return "\n".join(lines)


def results_markdown(results: dict, data_dir: str | Path, command: str, seconds: float,
                     config: TrainConfig = TrainConfig(), zsl_images: str = "with-unseen") -> str:
    """docs/RESULTS.md: what was run, on what, and the tables per label split (the first one's ZSL on the
    images ``zsl_images`` names, a second ZSL table on the other image set)."""
    stats_path = Path(data_dir) / "stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
    lines = [
        "# Results: zero-shot multi-label tagging",
        "",
        f"Written by `{command}` ({platform.machine()}, {torch.get_num_threads()} torch threads, torch"
        f" {torch.__version__}; {seconds / 60:.1f} min for all runs, feature extraction included).",
        "Each method trains on the seen labels of a split only; the test images and unseen labels are"
        " touched only for the scores below. Mean ± standard deviation over seeds; CONSE has no seed."
        f" ZSL: {ZSL_IMAGES[zsl_images]}, ranking the unseen labels (a second table: the other image set);"
        " GZSL: all test images, all labels. mAP leaves out labels without a positive test image. Percent.",
    ]
    methods = dict.fromkeys(method for per_method in results.values() for method in per_method)
    lines += ["", "Methods:", "", *(f"- **{method}**: {get_method(method).describe(config)}." for method in methods)]
    if stats:
        lines += ["", "Dataset: " + ", ".join(f"{k} {v}" for k, v in stats.items() if not isinstance(v, (dict, list))) + "."]
    for name, per_method in results.items():
        lines += ["", f"## Label split `{name}`", "", summary_table(per_method), "",
                  zsl_section(per_method, zsl_images)]
        if any("decisions" in runs[0] for runs in per_method.values()):
            lines += ["", "Decisions (yes / no per label) on every test image, micro over image-label pairs: the"
                          " model's default rule (`predict` with no decision option), 0.5 everywhere, each image's 3"
                          " best labels (of the seen, or of the unseen labels):", "", decisions_table(per_method)]
        if any("photos" in runs[0] for runs in per_method.values()):
            lines += ["", f"Real photos (`--photos`), each ranking the photo check's own vocabulary with the models"
                          f" trained on split `{name}`:", "", photos_table(per_method)]
    return "\n".join(lines) + "\n"
