"""predict --out: a photo library into part files, resumable, split across torchrun processes, each image once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from clip_decoder.cli import main
from clip_decoder.library import read_results
from test_scale import start_torchrun, torchrun_workers

LABELS = "cat,dog,bird,red"


@pytest.fixture(scope="module")
def library(tmp_path_factory, cat_photo) -> Path:
    """13 images: the cat photo, 11 coloured squares and one broken file (position 5)."""
    folder = tmp_path_factory.mktemp("library")
    shutil.copy(cat_photo, folder / "00-cat.jpg")
    for i in range(11):
        Image.new("RGB", (48, 40), (20 * i, 255 - 20 * i, 90)).save(folder / f"{i + 1:02d}-square.png")
    (folder / "05-square.png").write_bytes(b"not a png")
    Image.new("RGB", (30, 30), "red").save(folder / "12-red.png")
    return folder


def stdout_records(capsys, library: Path) -> list[dict]:
    assert main(["predict", "--labels", LABELS, str(library)]) == 1  # (the broken file)
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_out_writes_the_records_predict_prints_with_errors_in_place_and_resumes_only_what_is_missing(library, tmp_path,
                                                                                                     capsys):
    printed = stdout_records(capsys, library)
    out = tmp_path / "out"
    assert main(["predict", "--labels", LABELS, "--out", str(out), "--part-size", "4", str(library)]) == 1
    rows = list(read_results(out))
    assert [row["index"] for row in rows] == list(range(13))
    assert "cannot load image" in rows[5]["error"] and "05-square.png" in rows[5]["image"]
    good = [row for row in rows if "error" not in row]
    assert [{key: row[key] for key in ("image", "scores", "labels")} for row in good] == printed
    assert all(len(row["content_key"]) == 64 for row in good)
    parts = sorted((out / "parts").iterdir())
    assert len(parts) == 4
    before = {part.name: (part.stat().st_mtime_ns, part.read_bytes()) for part in parts}
    merged = (out / "results.jsonl").read_bytes()
    parts[2].unlink()
    (out / "results.jsonl").unlink()
    capsys.readouterr()
    assert main(["predict", "--labels", LABELS, "--out", str(out), "--part-size", "4", str(library)]) == 0
    assert "4 images scored" in capsys.readouterr().err  # only the missing part's
    after = {part.name: (part.stat().st_mtime_ns, part.read_bytes()) for part in sorted((out / "parts").iterdir())}
    assert {name: value for name, value in after.items() if name != parts[2].name} == \
        {name: value for name, value in before.items() if name != parts[2].name}  # untouched
    assert after[parts[2].name][1] == before[parts[2].name][1] and (out / "results.jsonl").read_bytes() == merged


def test_parquet_holds_the_same_rows(library, tmp_path, capsys):
    pytest.importorskip("pyarrow")
    for fmt in ("jsonl", "parquet"):
        assert main(["predict", "--labels", LABELS, "--out", str(tmp_path / fmt), "--out-format", fmt, str(library)]) == 1
    as_jsonl, as_parquet = list(read_results(tmp_path / "jsonl")), list(read_results(tmp_path / "parquet"))
    assert [row.keys() for row in as_parquet] == [row.keys() for row in as_jsonl]
    for a, b in zip(as_jsonl, as_parquet):
        assert {k: v for k, v in a.items() if k != "scores"} == {k: v for k, v in b.items() if k != "scores"}
        assert all(abs(a["scores"][label] - b["scores"][label]) < 1e-6 for label in a.get("scores", {}))


def test_another_run_a_foreign_folder_and_a_damaged_part_are_refused_naming_them(library, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["predict", "--labels", LABELS, "--out", str(out), "--part-size", "4", str(library)]) == 1
    capsys.readouterr()
    assert main(["predict", "--labels", "cat,dog", "--out", str(out), "--part-size", "4", str(library)]) == 2
    assert "holds another run (its labels differs" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(["predict", "--labels", LABELS, "--out", str(tmp_path / "mine"), str(library)]) == 2
    assert "holds other files" in capsys.readouterr().err and (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    part = out / "parts" / "part-00000001.jsonl"
    part.write_text('{"index": 4}\n{oops\n')
    (out / "results.jsonl").unlink()
    assert main(["predict", "--labels", LABELS, "--out", str(out), "--part-size", "4", str(library)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {part}: a damaged part file") and len(err.splitlines()) == 1


def test_torchrun_splits_the_library_and_a_killed_worker_costs_only_time(library, tmp_path):
    """2 processes, --max-restarts 1: SIGKILL rank 0 once some parts are written; the group restarts, skips the
    written parts, and the results equal one uninterrupted process's, bit for bit (one thread each)."""
    args = ["predict", "--labels", LABELS, "--part-size", "1", "--batch-size", "1", str(library)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "clip_decoder", *args, "--out", str(tmp_path / "one")], env=env,
                   capture_output=True, check=False, timeout=300)
    killed = tmp_path / "killed"
    log = (tmp_path / "torchrun.log").open("w")
    process = start_torchrun([*args, "--out", str(killed)], processes=2, restarts=1, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and len(list((killed / "parts").glob("*.jsonl"))) < 3:
            time.sleep(0.02)
        parts_at_kill = len(list((killed / "parts").glob("*.jsonl")))
        assert 0 < parts_at_kill < 13, "the run ended (or never started) before it could be killed"
        os.kill(torchrun_workers(process)[0], signal.SIGKILL)
        process.wait(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    log_text = (tmp_path / "torchrun.log").read_text()
    assert process.returncode == 0, log_text[-2000:]  # (under torchrun the broken image is a row, not an exit status)
    assert "exitcode: -9" in log_text  # the kill, which the restarted group survived
    rows = list(read_results(killed))
    assert [row["index"] for row in rows] == list(range(13))  # each image once
    assert rows == list(read_results(tmp_path / "one"))  # the same scores and labels as one uninterrupted process


def test_two_torchrun_nodes_share_one_library(library, tmp_path):
    """--nnodes 2 (two launchers on this machine, as on two nodes sharing a filesystem): the global ranks split the
    parts, and the results are one process's."""
    args = ["predict", "--labels", LABELS, "--part-size", "2", str(library)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    assert subprocess.run([sys.executable, "-m", "clip_decoder", *args, "--out", str(tmp_path / "one")], env=env,
                          capture_output=True, timeout=300).returncode == 1  # (the broken file)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
                               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
                               "-m", "clip_decoder", *args, "--out", str(tmp_path / "nodes")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for rank in (0, 1)]
    try:
        logs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert "6 images scored by this process" in logs[1]  # node 1 (global rank 1): parts 1, 3 and 5, 2 images each
    rows = list(read_results(tmp_path / "nodes"))
    assert [row["index"] for row in rows] == list(range(13)) and rows == list(read_results(tmp_path / "one"))
