"""End to end on a tiny dataset the tests build: train, evaluate, predict; the feature cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import fields

import numpy as np
import pytest
import torch
from conftest import HEAD, TINY_SPLIT, image_features
from PIL import Image
from sklearn.metrics import average_precision_score

from clip_decoder import CLIPDecoder, ClipDecoderError
from clip_decoder.cli import build_parser, main, training_config
from clip_decoder.configs import HeadConfig, PriorConfig
from clip_decoder.data.folder import read_part, read_split, target_matrix, write_part
from clip_decoder.evaluate import evaluate_model
from clip_decoder.features import FeatureCache, FeatureLocation
from clip_decoder.metrics import zsl_gzsl_metrics
from clip_decoder.prompts import SINGLE_TEMPLATE
from clip_decoder.training import methods
from clip_decoder.training.config import TrainConfig


def test_train_writes_a_model_folder_with_log_and_curves(trained):
    out, _, _ = trained
    assert {"config.json", "model.safetensors", "train_log.jsonl", "training.json", "curves.png"} <= {
        p.name for p in out.iterdir()}
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3] and all(r["loss"] > 0 for r in log)
    summary = json.loads((out / "training.json").read_text())
    assert summary["selected_epoch"] == max(log, key=lambda r: r["val_mAP_seen"])["epoch"]
    config = json.loads((out / "config.json").read_text())
    assert config["labels"] == TINY_SPLIT["seen"] and config["head"]["cosine_skip"] is True
    assert CLIPDecoder.from_pretrained(out).head.skip_proj.weight.shape == (24, 32)  # text dim x head dim
    assert Image.open(out / "curves.png").size[0] > 100


def test_ml_decoder_baseline_uses_ml_decoders_head_and_no_alignment():
    ml_decoder, clip_decoder = (methods.decoder_method(name).recipe(TrainConfig()) for name in ("ml-decoder", "clip-decoder"))
    assert ml_decoder.head["cosine_skip"] is False and ml_decoder.losses == {"cls": 1.0} and not ml_decoder.prior.on
    assert clip_decoder.head["cosine_skip"] is True and clip_decoder.losses == {"cls": 1.0, "clip": 0.1}


def test_each_method_trains_for_its_tuned_length_unless_told():
    def epochs(name: str, config: TrainConfig) -> int:
        return methods.decoder_method(name).recipe(config).epochs

    assert (epochs("clip-decoder", TrainConfig()), epochs("ml-decoder", TrainConfig())) == (10, 20)
    assert epochs("ml-decoder", TrainConfig(method="clip-decoder")) == 20  # the method, not the options' name
    assert epochs("ml-decoder", TrainConfig(epochs=3)) == 3


def test_unseen_labels_are_never_embedded_in_training(trained):
    _, _, embedded = trained
    assert embedded, "the text tower was not used"
    assert not [text for text in embedded if any(name in text for name in TINY_SPLIT["unseen"])]


def test_evaluate_agrees_with_an_independent_computation_of_the_metrics(trained, tiny_dataset, tmp_path, capsys):
    out, cache, _ = trained
    metrics_path = tmp_path / "metrics.json"
    assert main(["evaluate", "--model", str(out), "--data", str(tiny_dataset), "--split",
                 str(tiny_dataset / "split.json"), "--json", str(metrics_path), "--cache", str(cache)]) == 0
    metrics = json.loads(metrics_path.read_text())
    assert "ZSL mAP" in capsys.readouterr().out
    keys = {"mAP", "P@3", "R@3", "F1@3", "P@5", "R@5", "F1@5", "n_images", "n_labels", "n_labels_without_positives"}
    assert set(metrics["gzsl"]) == keys and set(metrics["zsl"]) == keys | {"zsl_images"}
    assert metrics["zsl"]["zsl_images"] == "with-unseen"
    every_path = tmp_path / "every.json"
    assert main(["evaluate", "--model", str(out), "--data", str(tiny_dataset), "--split",
                 str(tiny_dataset / "split.json"), "--json", str(every_path), "--cache", str(cache),
                 "--zsl-images", "all"]) == 0
    every = json.loads(every_path.read_text())
    assert "ZSL on every test image (the set of LESA" in capsys.readouterr().out
    assert every["zsl"]["zsl_images"] == "all" and every["gzsl"] == metrics["gzsl"]

    # The same scores (the cached features through the model's scorer), metrics by scikit-learn. That
    # predict gives these scores is test_evaluate_and_predict_share_one_scoring_path: the tiny test
    # images have near-duplicates whose order float16-cached tokens can swap.
    samples = read_part(tiny_dataset, "test")
    labels = TINY_SPLIT["seen"] + TINY_SPLIT["unseen"]
    model = CLIPDecoder.from_pretrained(out)
    features = FeatureCache(model.image_tower, cache).get([s.image for s in samples], progress=False)
    scores = model.scorer.score_stored(features.tokens, features.pooled, model.scorer.vocabulary(labels))
    targets = np.array([[label in s.labels for label in labels] for s in samples], dtype=int)
    gzsl = np.mean([average_precision_score(targets[:, j], scores[:, j]) for j in range(len(labels)) if targets[:, j].any()])
    rows = targets[:, 4:].any(axis=1)
    zsl = np.mean([average_precision_score(targets[rows, j], scores[rows, j]) for j in (4, 5) if targets[rows, j].any()])
    zsl_every = np.mean([average_precision_score(targets[:, j], scores[:, j]) for j in (4, 5) if targets[:, j].any()])
    assert metrics["gzsl"]["n_images"] == every["zsl"]["n_images"] == len(samples)
    assert metrics["zsl"]["n_images"] == rows.sum() < len(samples)
    assert metrics["gzsl"]["mAP"] == pytest.approx(100 * gzsl, abs=1e-4)
    assert metrics["zsl"]["mAP"] == pytest.approx(100 * zsl, abs=1e-4)
    assert every["zsl"]["mAP"] == pytest.approx(100 * zsl_every, abs=1e-4)


def test_feature_cache_encodes_each_image_once_and_rebuilds_bad_entries(tiny_clip_dir, tiny_dataset, tmp_path):
    model = CLIPDecoder.create(backbone=f"hf:{tiny_clip_dir}", dim=32, heads=4, ffn_dim=64)
    paths = [s.image for s in read_part(tiny_dataset, "test")][:6]
    first = FeatureCache(model.image_tower, tmp_path).get(paths, progress=False)
    assert first.kept == list(range(6)) and first.tokens.shape == (6, 16, 24)
    again = FeatureCache(model.image_tower, tmp_path)
    second = again.get(paths, progress=False)
    assert again.encoded == 0
    np.testing.assert_array_equal(second.tokens.numpy(), first.tokens.numpy())
    entry = next(again.folder.glob("*.safetensors"))
    entry.write_bytes(b"corrupt")
    third = FeatureCache(model.image_tower, tmp_path)
    third.get(paths, progress=False)
    assert third.encoded == 1


def test_feature_cache_reports_and_skips_unreadable_images(tiny_clip_dir, tiny_dataset, tmp_path, capsys):
    model = CLIPDecoder.create(backbone=f"hf:{tiny_clip_dir}", dim=32, heads=4, ffn_dim=64)
    good = read_part(tiny_dataset, "test")[0].image
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    features = FeatureCache(model.image_tower, tmp_path / "cache").get([broken, good, tmp_path / "gone.png"], progress=False)
    assert features.kept == [1] and set(features.failed) == {0, 2}
    err = capsys.readouterr().err
    assert "broken.png" in err and "gone.png" in err


def test_bench_runs_every_method_over_seeds_and_writes_results(tiny_dataset, tiny_clip_dir, tmp_path, capsys):
    results_path, markdown, photos = tmp_path / "results.json", tmp_path / "RESULTS.md", tmp_path / "photos"
    split = str(tiny_dataset / "split.json")
    # A photo check: four test images, each ranking every colour name
    photos.mkdir()
    rows = (tiny_dataset / "test.csv").read_text().splitlines(keepends=True)[:5]  # the header and four images
    (photos / "photos.csv").write_text("".join(rows).replace("images/", f"{tiny_dataset}/images/"))
    (photos / "vocabulary.txt").write_text("\n".join(TINY_SPLIT["seen"] + TINY_SPLIT["unseen"]))
    assert main(["bench", "--data", str(tiny_dataset), "--splits", split, "--seeds", "0", "1",
                 "--methods", "clip-decoder", "ml-decoder", "linear", "--backbone", f"hf:{tiny_clip_dir}",
                 "--epochs", "2", "--batch-size", "8", "--val-fraction", "0.25", "--cache", str(tmp_path / "cache"),
                 "--json", str(results_path), "--markdown", str(markdown), "--photos", str(photos), *HEAD,
                 "--save-models", str(tmp_path / "models")]) == 0
    results = json.loads(results_path.read_text())["split"]
    assert {method: len(runs) for method, runs in results.items()} == {"clip-decoder": 2, "ml-decoder": 2, "linear": 2}
    # the decoder models are kept: each evaluates to its benchmark row
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [
        f"split-{method}-seed{seed}" for method in ("clip-decoder", "ml-decoder") for seed in (0, 1)]
    kept = CLIPDecoder.from_pretrained(tmp_path / "models" / "split-clip-decoder-seed1")
    assert list(kept.config.labels) == TINY_SPLIT["seen"] and kept.config.prior.on
    cache = FeatureLocation(cache=tmp_path / "cache")
    again = evaluate_model(kept, tiny_dataset, read_split(split), cache, progress=False)
    assert again["zsl"]["mAP"] == pytest.approx(results["clip-decoder"][1]["zsl"]["mAP"], abs=0.01)
    again = evaluate_model(kept, tiny_dataset, read_split(split), cache, progress=False, zsl_images="all")
    assert again["zsl"]["mAP"] == pytest.approx(results["clip-decoder"][1]["zsl_by_images"]["all"]["mAP"], abs=0.01)
    for runs in results.values():  # each run's ZSL on both image sets; its "zsl" is the default's
        assert all(run["zsl"] == run["zsl_by_images"]["with-unseen"] for run in runs)
        assert all(run["zsl_by_images"]["all"]["n_images"] == run["gzsl"]["n_images"] > run["zsl"]["n_images"]
                   for run in runs)
    for runs in results.values():
        assert all(run["photos"]["images"] == 4 and 0 <= run["photos"]["top1_correct"] <= 4 for run in runs)
    page = markdown.read_text()
    assert "Real photos (`--photos`)" in page and "| linear | 2 |" in page.split("Real photos")[1]
    # the second ZSL table: every test image, mean ± spread over the seeds of the runs' own numbers
    every = page.split("ZSL with `--zsl-images all`: every test image (the set of LESA")[1].split("Real photos")[0]
    assert "| method | runs | ZSL mAP | ZSL P@3 | ZSL R@3 | ZSL F1@3 |" in every
    runs = [run["zsl_by_images"]["all"] for run in results["ml-decoder"]]
    assert (f"| ml-decoder | 2 | {np.mean([r['mAP'] for r in runs]):.1f} ± {np.std([r['mAP'] for r in runs], ddof=1):.1f}"
            f" | {np.mean([r['P@3'] for r in runs]):.1f} ± ") in every
    assert "| clip-decoder | 2 |" in page and "Label split `split`" in capsys.readouterr().out
    assert "- **clip-decoder**: head d 32, FFN 64, dropout 0.05, with cosine skip; ASL + 0.1 x alignment; 2 epochs" in page
    assert "- **ml-decoder**: head d 32, FFN 64, dropout 0.05, without cosine skip; ASL; 2 epochs" in page


def test_bench_jobs_run_the_split_seed_pairs_in_processes_with_the_same_results(tiny_dataset, tiny_clip_dir, tmp_path):
    from clip_decoder.benchmark import run_benchmark

    config = TrainConfig(epochs=2, batch_size=8, val_fraction=0.25, head={"dim": 32, "heads": 4, "ffn_dim": 64})
    splits = [tiny_dataset / "split.json", tmp_path / "other.json"]
    splits[1].write_text(json.dumps({"seen": TINY_SPLIT["unseen"] + TINY_SPLIT["seen"][:1], "unseen": TINY_SPLIT["seen"][1:]}))
    methods_run = ["clip-decoder", "zero-shot-prior", "linear"]
    cache = tmp_path / "cache"
    alone = run_benchmark(tiny_dataset, splits, (0, 1), methods_run, f"hf:{tiny_clip_dir}", config,
                          FeatureLocation(cache=cache), progress=False, save_models=tmp_path / "models-1")
    # The command line, as `python -m clip_decoder` (a worker imports that module again: it must not rerun the CLI)
    command = subprocess.run(
        [sys.executable, "-m", "clip_decoder", "bench", "--data", str(tiny_dataset), "--splits", *map(str, splits),
         "--seeds", "0", "1", "--methods", *methods_run, "--backbone", f"hf:{tiny_clip_dir}", "--epochs", "2",
         "--batch-size", "8", "--val-fraction", "0.25", *HEAD, "--cache", str(cache), "--jobs", "2",
         "--json", str(tmp_path / "results.json"), "--save-models", str(tmp_path / "models-2")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert command.returncode == 0, command.stderr[-2000:]
    assert command.stdout.count("Label split") == 2 and command.stdout.count(": ZSL mAP") == 10  # a line per run
    parallel = json.loads((tmp_path / "results.json").read_text())
    assert list(parallel) == ["split", "other"] and list(parallel["other"]) == methods_run
    for split in alone:  # each seed's run in its place (one thread per worker: the last bits of training may differ)
        for method, runs in alone[split].items():
            assert len(parallel[split][method]) == len(runs) == (1 if method == "zero-shot-prior" else 2)
            for one, other in zip(runs, parallel[split][method]):
                for part in ("zsl", "gzsl"):
                    assert other[part]["mAP"] == pytest.approx(one[part]["mAP"], abs=0.5)
    assert sorted(p.name for p in (tmp_path / "models-2").iterdir()) == sorted(p.name for p in (tmp_path / "models-1").iterdir())
    with pytest.raises(ClipDecoderError, match="jobs must be at least 1"):
        run_benchmark(tiny_dataset, splits, jobs=0)


def test_methods_that_differ_only_in_how_the_prior_scores_share_one_training(tiny_dataset, tiny_clip_dir, tmp_path,
                                                                            monkeypatch):
    from clip_decoder.benchmark import run_benchmark

    trainings = []
    original = methods.fit
    monkeypatch.setattr(methods, "fit", lambda *args, **kwargs: (trainings.append(args[4].method), original(*args, **kwargs))[1])
    config = TrainConfig(epochs=2, batch_size=8, val_fraction=0.25, head={"dim": 32, "heads": 4, "ffn_dim": 64})

    def bench(*names: str) -> dict:
        results = run_benchmark(tiny_dataset, [tiny_dataset / "split.json"], (0,), names, f"hf:{tiny_clip_dir}", config,
                                FeatureLocation(cache=tmp_path / "cache"), progress=False)["split"]
        return {name: {part: runs[0][part] for part in ("zsl", "gzsl")} for name, runs in results.items()}

    together = bench("clip-decoder", "clip-decoder-no-prior", "clip-decoder-one-prior-weight", "ml-decoder")
    assert trainings == ["clip-decoder", "ml-decoder"]  # the two prior ablations scored clip-decoder's head
    assert together["clip-decoder-no-prior"] != together["clip-decoder"]
    alone = bench("clip-decoder-no-prior")
    assert trainings[2:] == ["clip-decoder-no-prior"]
    for part in ("zsl", "gzsl"):  # (labels embedded in other batches may differ in the last bit)
        assert alone["clip-decoder-no-prior"][part] == pytest.approx(together["clip-decoder-no-prior"][part], abs=1e-3)


def test_conse_ranks_the_photos_class_first(offline_model, cat_photo):
    from clip_decoder.training.baselines import ConSE

    conse = ConSE(offline_model.zero_shot)
    pooled = image_features(offline_model, [cat_photo]).pooled
    scores = conse.score(pooled, offline_model.embed_labels(["cat", "airplane", "guitar", "pizza"], SINGLE_TEMPLATE))
    assert scores.argmax() == 0


def test_evaluate_and_predict_share_one_scoring_path(trained, tmp_path):
    """The same metrics from evaluate's cached features as from predict's scores of the same images.

    The images are random noise, so no two score within the cache's float16 rounding of each
    other (the colour-quadrant images have near-duplicates whose order that rounding can swap)."""
    out, cache, _ = trained
    model = CLIPDecoder.from_pretrained(out)
    rng = np.random.default_rng(0)
    labels = TINY_SPLIT["seen"] + TINY_SPLIT["unseen"]
    rows = []
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"noise-{i}.png")
        rows.append((f"noise-{i}.png", [labels[i % 6], labels[(i * 7 + 1) % 6]]))
    write_part(tmp_path, "test", rows)
    (tmp_path / "split.json").write_text(json.dumps(TINY_SPLIT))
    split = read_split(tmp_path / "split.json")
    evaluated = evaluate_model(model, tmp_path, split, FeatureLocation(cache=cache), progress=False)
    samples = read_part(tmp_path, "test")
    scores = model.predict([s.image for s in samples], list(split.all))
    predicted = zsl_gzsl_metrics(scores, target_matrix(samples, split.all), list(split.all), list(split.unseen))
    for part in ("zsl", "gzsl"):
        assert evaluated[part]["mAP"] == pytest.approx(predicted[part]["mAP"], abs=0.01)


def test_a_new_method_is_one_registry_entry(tiny_dataset, tiny_clip_dir, tmp_path, monkeypatch):
    """A toy method, declared only through the registry, runs in the benchmark harness and the CLI."""
    monkeypatch.setattr(methods, "_METHODS", dict(methods._METHODS))  # the registry as it was, after the test

    def random_projection(run: methods.MethodRun) -> methods.ScoreFunction:
        embed = run.embedder()
        generator = torch.Generator().manual_seed(run.config.seed)
        projection = torch.randn(run.parts["train"].pooled.shape[1], run.backbone.text.dim, generator=generator)

        def score(features, labels) -> np.ndarray:
            images = torch.nn.functional.normalize(features.pooled.float() @ projection, dim=-1)
            return (images @ embed(labels, run.templates).T).numpy()

        return score

    methods.register_method(methods.ScoreMethod(
        "toy", "a random projection of the pooled image against the label texts", random_projection,
        lambda config: f"random projection, {config.templates} prompts"))
    results_path, markdown = tmp_path / "results.json", tmp_path / "RESULTS.md"
    assert main(["bench", "--data", str(tiny_dataset), "--splits", str(tiny_dataset / "split.json"), "--seeds", "0", "1",
                 "--methods", "toy", "--backbone", f"hf:{tiny_clip_dir}", "--cache", str(tmp_path / "cache"),
                 "--json", str(results_path), "--markdown", str(markdown), "--zsl-images", "all"]) == 0
    runs = json.loads(results_path.read_text())["split"]["toy"]
    assert len(runs) == 2 and runs[0]["zsl"]["mAP"] != runs[1]["zsl"]["mAP"]  # each seed its own projection
    assert all(run["zsl"] == run["zsl_by_images"]["all"] for run in runs)  # --zsl-images all: the headline ZSL
    page = markdown.read_text()
    assert "- **toy**: random projection, ensemble prompts." in page
    assert "ZSL: every test image (the set of LESA" in page
    assert "ZSL with `--zsl-images with-unseen`: the test images with an unseen label (ML-Decoder's set)." in page
    with pytest.raises(ClipDecoderError, match="method 'toy' trains no decoder head"):
        methods.decoder_method("toy")  # so `clip-decoder train` does not offer it


def test_command_line_defaults_are_the_config_defaults(tmp_path):
    """Each training option is declared once, in TrainConfig / HeadConfig, and the CLI takes it from there."""
    parser = build_parser()
    args = parser.parse_args(["train", "--data", "d", "--split", "s.json", "--out", "o"])
    assert training_config(args) == TrainConfig()
    options = {action.dest: action for action in parser._subparsers._group_actions[0].choices["train"]._actions}
    for item in fields(TrainConfig):
        if item.name not in ("head", "prior"):
            assert item.name in options and options[item.name].default == item.default, item.name
    for item in fields(PriorConfig):  # the prior as one setting: --prior-<name>, what training measures aside
        if item.name in ("reference_mean", "offset", "head_only"):
            assert f"prior_{item.name}" not in options
        else:
            assert options[f"prior_{item.name}"].default == item.default, item.name
    for item in fields(HeadConfig):
        if item.name not in ("text_dim", "image_dim"):
            assert options[item.name].default is None and str(item.default) in options[item.name].help
    custom = parser.parse_args(["train", "--data", "d", "--split", "s.json", "--out", "o", "--dim", "64",
                                "--no-cosine-skip", "--method", "ml-decoder", "--lr", "0.01", "--prior-seen-weight", "2"])
    config = training_config(custom)
    assert (config.lr, config.method, config.head) == (0.01, "ml-decoder", {"dim": 64, "cosine_skip": False})
    assert config.prior == PriorConfig(seen_weight=2.0)
    assert methods.decoder_method(config.method).recipe(config).head == {
        **methods.decoder_method("ml-decoder").recipe(TrainConfig()).head, "dim": 64}


def test_a_new_loss_is_one_registry_entry(tiny_dataset, tiny_clip_dir, tmp_path, monkeypatch, request):
    """A loss term and a decoder method naming it, declared only through the registries, train from the CLI."""
    from clip_decoder.training import losses

    monkeypatch.setattr(methods, "_METHODS", dict(methods._METHODS))  # the registries as they were, after the test
    request.addfinalizer(lambda: losses.LOSS_TERMS.pop("small-logits", None))
    losses.register_loss(losses.LossTerm("small-logits", lambda out: out.logits.pow(2).mean(), weight=0.5))
    methods.register_method(methods.DecoderMethod("toy-decoder", "ASL plus small logits", epochs=2,
                                                  losses=("cls", "small-logits")))
    out = tmp_path / "toy"
    assert main(["train", "--data", str(tiny_dataset), "--split", str(tiny_dataset / "split.json"), "--out", str(out),
                 "--backbone", f"hf:{tiny_clip_dir}", "--method", "toy-decoder", "--batch-size", "8",
                 "--val-fraction", "0.25", "--cache", str(tmp_path / "cache"), *HEAD]) == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(set(record) >= {"loss", "cls", "small-logits"} and "clip" not in record for record in log)
    for record in log:  # epoch means of the total and its terms
        assert record["loss"] == pytest.approx(record["cls"] + 0.5 * record["small-logits"], abs=1e-4)
    assert "ASL + 0.5 x small-logits" in methods.get_method("toy-decoder").describe(TrainConfig())
