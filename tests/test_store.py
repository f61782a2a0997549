"""The sharded feature store: round trip, resume, refusal of bad shards, training and evaluation from it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import HEAD
from safetensors.torch import load_file
from test_scale import TOLERANCE, torchrun, train_args

from clip_decoder import CLIPDecoder, metrics, scoring
from clip_decoder.cli import main
from clip_decoder.data.folder import read_part, read_split
from clip_decoder.errors import ClipDecoderError
from clip_decoder.evaluate import evaluate_model
from clip_decoder.features import FeatureCache, FeatureLocation, FeatureStore, StoreWriter, file_key


@pytest.fixture
def tower(tiny_clip_dir):
    return CLIPDecoder.create(backbone=f"hf:{tiny_clip_dir}", dim=32, heads=4, ffn_dim=64).image_tower


def test_store_rows_equal_the_cache_entries_in_any_order(tower, tiny_dataset, tmp_path):
    paths = [s.image for s in read_part(tiny_dataset, "train")][:10]
    paths.append(paths[3])  # a second copy of one content: stored once
    store = FeatureStore.for_tower(tower, tmp_path / "store")
    store.extract_missing(paths, progress=False, shard_rows=4)
    distinct = len({file_key(path) for path in paths})  # the tiny set repeats some images too
    assert len(store) == distinct and sorted(len(s.keys) for s in store.shards) == sorted([4, 4, distinct - 8])
    cached = FeatureCache(tower, tmp_path / "cache").get(paths, progress=False)
    stored = FeatureStore.for_tower(tower, tmp_path / "store").get(paths, progress=False)
    assert stored.kept == cached.kept
    assert stored.tokens.shape == tuple(cached.tokens.shape) and stored.tokens[:].dtype == torch.float16
    assert torch.equal(stored.tokens[:], cached.tokens) and torch.equal(stored.pooled[:], cached.pooled)
    order = torch.tensor([10, 0, 7, 3, 3, 5])  # any order, repeats too
    assert torch.equal(stored.tokens[order], cached.tokens[order]) and torch.equal(stored.pooled[2:9], cached.pooled[2:9])


def test_the_writer_splits_rows_into_shards_of_the_size_asked(tmp_path):
    store = FeatureStore(tmp_path)
    writer = StoreWriter(store, shard_rows=4)
    tokens, pooled = np.random.default_rng(0).normal(size=(2, 10, 3, 5)), np.arange(100.0).reshape(2, 10, 5)
    for batch in range(2):  # 10 rows, then 10 more: shards of 4, 4, 4, 4, 4
        writer.add([f"k{batch}-{i}" for i in range(10)], tokens[batch], pooled[batch])
    writer.flush()
    store.refresh()
    assert sorted(len(s.keys) for s in store.shards) == [4] * 5
    rows_tokens, rows_pooled = store.rows(["k1-9", "k0-0"])
    np.testing.assert_array_equal(rows_tokens[:].numpy(), tokens[[1, 0], [9, 0]].astype(np.float16))
    np.testing.assert_array_equal(rows_pooled[:].numpy(), pooled[[1, 0], [9, 0]].astype(np.float32))
    with pytest.raises(ClipDecoderError, match="not in the feature store"):
        store.rows(["k0-0", "absent"])


def test_an_interrupted_extraction_resumes_where_it_stopped(tower, tiny_dataset, tmp_path, monkeypatch):
    paths = [s.image for s in read_part(tiny_dataset, "train")][:10]
    flush, calls = StoreWriter.flush, []

    def dies_on_the_second_shard(writer):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a kill between shards
        flush(writer)

    monkeypatch.setattr(StoreWriter, "flush", dies_on_the_second_shard)
    store = FeatureStore.for_tower(tower, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        store.extract_missing(paths, progress=False, shard_rows=4)
    monkeypatch.setattr(StoreWriter, "flush", flush)
    orphan = store.folder / "0123456789abcdef0123.tokens.npy"  # arrays of a shard whose manifest was never written
    np.save(orphan, np.zeros((1, 2, 3), np.float16))
    (store.folder / ".x.tokens.npy.99.tmp").write_bytes(b"half")
    again = FeatureStore.for_tower(tower, tmp_path)
    assert len(again) == 4  # the first shard
    again.remove_leftovers()
    assert not orphan.exists() and not list(store.folder.glob(".*.tmp"))
    again.extract_missing(paths, progress=False, shard_rows=4)
    distinct = len({file_key(path) for path in paths})
    assert again.encoded == distinct - 4 and len(again) == distinct
    cached = FeatureCache(tower, tmp_path / "cache").get(paths, progress=False)
    resumed = again.get(paths, progress=False).tokens[:]
    # The first shard came from the cache's first batch: equal bits. The rest went through the tower in
    # other batches, which moves a float16 token by rounding noise on more than one thread.
    assert torch.equal(resumed[:4], cached.tokens[:4])
    torch.testing.assert_close(resumed, cached.tokens, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("damage", ["truncated", "other width", "manifest"])
def test_a_corrupt_or_mismatched_shard_is_refused_naming_the_file(tower, tiny_dataset, tmp_path, damage):
    paths = [s.image for s in read_part(tiny_dataset, "train")][:3]
    store = FeatureStore.for_tower(tower, tmp_path)
    store.extract_missing(paths, progress=False)
    name = next(store.folder.glob("*.tokens.npy")).name.split(".")[0]
    tokens = store.folder / f"{name}.tokens.npy"
    if damage == "truncated":
        tokens.write_bytes(tokens.read_bytes()[:-100])
        bad = tokens
    elif damage == "other width":
        np.save(tokens, np.zeros((3, 16, 7), np.float16))
        bad = tokens
    else:
        bad = store.folder / f"{name}.json"
        bad.write_text(json.dumps({"format": 1, "rows": 5, "keys": ["a"]}))
    with pytest.raises(ClipDecoderError, match=f"shard {bad}.*delete"):
        FeatureStore.for_tower(tower, tmp_path)


def test_training_from_the_store_equals_training_from_the_cache_bit_for_bit(tiny_dataset, tiny_clip_dir, tmp_path):
    """Dropout on: the same batches, targets, sentences and random draws, whichever holds the features."""
    cached, stored = tmp_path / "cached", tmp_path / "stored"
    args = ["train", "--data", str(tiny_dataset), "--split", str(tiny_dataset / "split.json"), "--backbone",
            f"hf:{tiny_clip_dir}", "--epochs", "2", "--batch-size", "8", "--val-fraction", "0.25",
            "--cache", str(tmp_path / "cache"), *HEAD]
    assert main([*args, "--out", str(cached)]) == 0
    assert main([*args, "--out", str(stored), "--store", str(tmp_path / "store")]) == 0
    assert list((tmp_path / "store").glob("store/*/*.tokens.npy"))
    weights = [load_file(out / "model.safetensors") for out in (cached, stored)]
    assert weights[0].keys() == weights[1].keys()
    for key, value in weights[0].items():
        assert torch.equal(weights[1][key], value), key
    logs = [[{k: v for k, v in json.loads(line).items() if k != "seconds"}
             for line in (out / "train_log.jsonl").read_text().splitlines()] for out in (cached, stored)]
    assert logs[0] == logs[1]
    configs = [json.loads((out / "config.json").read_text()) for out in (cached, stored)]
    assert configs[0] == configs[1]  # the prior's offset too (finish_training over the stored pooled features)


def test_evaluating_from_the_store_in_chunks_equals_evaluating_in_memory(trained, tiny_dataset, tmp_path, monkeypatch):
    out, cache, _ = trained
    model, split = CLIPDecoder.from_pretrained(out), read_split(tiny_dataset / "split.json")
    # Batches far smaller than the test set, so every chunked path runs several times. (The same for both
    # runs: the head's float noise depends on the batch size, and this tiny model's scores are near ties.)
    monkeypatch.setattr(scoring, "STORED_ROWS_PER_BATCH", 3)
    expected = evaluate_model(model, tiny_dataset, split, FeatureLocation(cache=cache), progress=False, zsl_images="all")
    monkeypatch.setattr(metrics, "ROWS_PER_CHUNK", 5)
    monkeypatch.setattr(metrics, "COLUMNS_PER_CHUNK", 2)
    got = evaluate_model(model, tiny_dataset, split, FeatureLocation(store=tmp_path), progress=False, zsl_images="all")
    assert list(tmp_path.glob("store/*/*.tokens.npy")) and not list(tmp_path.glob("store/*/.scores*"))
    for part in ("zsl", "gzsl"):
        assert got[part].keys() == expected[part].keys()
        for name, value in expected[part].items():
            close = got[part][name] == value if isinstance(value, str) else abs(got[part][name] - value) <= 1e-6
            assert close, (part, name, got[part][name], value)


def test_chunked_metrics_equal_whole_matrix_metrics(monkeypatch):
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 6, size=(37, 9)) / 5  # many ties
    targets = (rng.random((37, 9)) < 0.3).astype(np.float32)
    targets[:, 4] = 0  # a label without positives
    names = [f"l{i}" for i in range(9)]
    whole = metrics.zsl_gzsl_metrics(scores, targets, names, ["l1", "l4", "l7"])
    monkeypatch.setattr(metrics, "ROWS_PER_CHUNK", 4)
    monkeypatch.setattr(metrics, "COLUMNS_PER_CHUNK", 2)
    assert metrics.zsl_gzsl_metrics(scores, targets, names, ["l1", "l4", "l7"]) == whole
    scores[30, 2] = np.nan
    with pytest.raises(ClipDecoderError, match=r"1 NaN value\(s\), first at index \(30, 2\)"):
        metrics.zsl_gzsl_metrics(scores, targets, names, ["l1"])


def test_torchrun_extracts_into_the_store_split_between_ranks_and_trains_as_one_process(
        tiny_dataset, tiny_clip_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*train_args(tiny_dataset, tiny_clip_dir, one, tmp_path / "cache"), "--store", str(tmp_path / "s1")]) == 0
    torchrun([*train_args(tiny_dataset, tiny_clip_dir, two, tmp_path / "cache"), "--store", str(tmp_path / "s2")])
    encoded = json.loads((two / "training.json").read_text())["images_encoded_per_process"]
    store = FeatureStore(next((tmp_path / "s2" / "store").iterdir()))
    distinct = {file_key(s.image) for s in read_part(tiny_dataset, "train")}
    assert min(encoded) > 0 and sum(encoded) == len(store) == len(distinct)
    assert len(store.shards) >= 2  # each rank wrote its own
    weights = [load_file(out / "model.safetensors") for out in (one, two)]
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, atol=TOLERANCE, rtol=0)


def test_extract_fills_the_store_that_train_and_evaluate_then_read(tiny_dataset, tiny_clip_dir, tmp_path, capsys):
    store, out = tmp_path / "store", tmp_path / "model"
    assert main(["extract", "--data", str(tiny_dataset), "--store", str(store), "--backbone", f"hf:{tiny_clip_dir}"]) == 0
    distinct = {file_key(s.image) for part in ("train", "test") for s in read_part(tiny_dataset, part)}
    assert f"{len(distinct)} images in the feature store" in capsys.readouterr().out
    assert main([*train_args(tiny_dataset, tiny_clip_dir, out, tmp_path / "cache"), "--store", str(store)]) == 0
    assert json.loads((out / "training.json").read_text())["images_encoded_per_process"] == [0]
    assert main(["evaluate", "--model", str(out), "--data", str(tiny_dataset), "--split",
                 str(tiny_dataset / "split.json"), "--store", str(store), "--json", str(tmp_path / "m.json")]) == 0
    assert main(["calibrate", "--model", str(out), "--data", str(tiny_dataset), "--split",
                 str(tiny_dataset / "split.json"), "--val-fraction", "0.25", "--store", str(store)]) == 0
    assert main(["bench", "--data", str(tiny_dataset), "--splits", str(tiny_dataset / "split.json"), "--seeds", "0",
                 "--methods", "linear", "zero-shot-prior", "--backbone", f"hf:{tiny_clip_dir}", "--store", str(store),
                 "--json", str(tmp_path / "bench.json")]) == 0  # the prior alone: the tiny CLIP's own view (joint space)
    assert not list(tmp_path.glob("cache/features/*/*.safetensors"))  # the per-image cache was never used
    assert len(list((store / "store").iterdir())) == 1  # one tower: the model's is the backbone's
    assert json.loads((tmp_path / "m.json").read_text())["gzsl"]["n_images"] == 16
    assert (out / "thresholds.json").is_file()
    assert set(json.loads((tmp_path / "bench.json").read_text())["split"]) == {"linear", "zero-shot-prior"}


def test_extract_batch_size_changes_no_stored_feature(tiny_dataset, tiny_clip_dir, tower, tmp_path, capsys):
    backbone = ["--backbone", f"hf:{tiny_clip_dir}", "--parts", "train"]
    assert main(["extract", "--data", str(tiny_dataset), "--store", str(tmp_path / "by8"), *backbone]) == 0
    assert main(["extract", "--data", str(tiny_dataset), "--store", str(tmp_path / "by5"), *backbone,
                 "--batch-size", "5"]) == 0
    paths = [s.image for s in read_part(tiny_dataset, "train")]
    by8, by5 = (FeatureStore.for_tower(tower, tmp_path / name).get(paths, progress=False) for name in ("by8", "by5"))
    torch.testing.assert_close(torch.as_tensor(by5.tokens[:]), torch.as_tensor(by8.tokens[:]), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(torch.as_tensor(by5.pooled[:]), torch.as_tensor(by8.pooled[:]), rtol=1e-5, atol=1e-5)
    capsys.readouterr()
    assert main(["extract", "--data", str(tiny_dataset), "--store", str(tmp_path / "none"), *backbone,
                 "--batch-size", "0"]) != 0
    assert "batch_size must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()  # refused before anything was made
