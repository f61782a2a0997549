"""The OpenClipart benchmark builder on a handful of synthetic tagged SVGs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

pytest.importorskip("cairosvg", reason="cairosvg (and the system library libcairo2) is not installed")

from PIL import Image

from clip_decoder.data.openclipart import MIN_TEST_POSITIVES, build_openclipart, clean_tags, label_splits
from clip_decoder.decoding import usable_cpus
from clip_decoder.errors import ClipDecoderError

BOMB = """<?xml version="1.0"?>
<!DOCTYPE svg [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>
<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><title>&b;</title></svg>"""


def svg(tags: list[str], body: str = '<rect width="40" height="40" fill="#c33"/>',
        size: tuple[int, int] = (40, 40)) -> str:
    """A small SVG carrying ``tags`` in its RDF dc:subject bag."""
    items = "".join(f"<rdf:li>{t}</rdf:li>" for t in tags)
    return (
        '<svg xmlns="http://www.w3.org/2000/svg" '
        'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" '
        'xmlns:dc="http://purl.org/dc/elements/1.1/" '
        f'width="{size[0]}" height="{size[1]}"><metadata><rdf:RDF><rdf:Description>'
        f"<dc:subject><rdf:Bag>{items}</rdf:Bag></dc:subject>"
        f"</rdf:Description></rdf:RDF></metadata>{body}</svg>"
    )


DOT = '<circle cx="{x}" cy="{y}" r="5" fill="black"/>'
FILES = {
    "pets/dog_a.svg": svg(["Dogs", "lemon_theme_icon"]),
    "pets/dog_b.svg": svg(["dog", "White"], '<rect width="30" height="30" fill="#3c3"/>'),
    "pets/copy/dog_b.svg": svg(["dog", "White"], '<rect width="30" height="30" fill="#3c3"/>'),
    "cars/car_a.svg": svg(["automobile", "Architetto Francesco Rollandin"]),
    "cars/car_b.svg": svg(["Car", "france"], '<rect width="20" height="40" fill="#33c"/>'),
    "cars/wide.svg": svg(["cars"], DOT.format(x=40, y=10), size=(80, 20)),
    "cars/tall.svg": svg(["auto"], DOT.format(x=10, y=40), size=(20, 80)),
    "flowers/f1.svg": svg([], '<circle cx="20" cy="20" r="15" fill="#cc3"/>'),
    "flowers/f2.svg": svg(["Flowers", "11"], '<circle cx="20" cy="20" r="9" fill="#c3c"/>'),
    "meta/only_meta.svg": svg(["icons", "theme", "hash", "unsorted"]),
    "rare/unicorn.svg": svg(["unicorn"]),
    "pets/empty.svg": svg(["dog"], ""),
    "broken.svg": "<svg><rect width='10' height='10'></svg",
    "bomb.svg": BOMB,
}


def read_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a dataset CSV as dicts."""
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny openclipart-like svg tree."""
    root = tmp_path_factory.mktemp("svg")
    for rel, text in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "flowers" / "link.svg").symlink_to(root / "pets" / "dog_a.svg")
    return root


@pytest.fixture(scope="module")
def built(source: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One build of the tiny tree."""
    out = tmp_path_factory.mktemp("bench") / "oc"
    return out, build_openclipart(out, source=source, image_size=32, min_images=2, progress=False)


def test_clean_tags_drops_stop_words_and_merges_variants() -> None:
    raw = ["Flags", "signs_and_symbols", "Architetto Francesco Rollandin", "automobile", "11",
           "hash(0x8a07724)", "Ice-Cream", "Europe", "white", "big_cats", "stickmen"]
    assert clean_tags(raw, known={"flag"}) == {"flag", "car", "ice cream", "cat", "stick figure"}


def test_csv_contract_and_labels(built: tuple[Path, dict]) -> None:
    out, stats = built
    rows = {}
    for part in ("train", "test"):
        assert (out / f"{part}.csv").read_text().splitlines()[0] == "image,labels"
        for row in read_csv(out / f"{part}.csv"):
            assert row["image"] not in rows and (out / row["image"]).is_file()
            assert row["labels"].split("|") == sorted(row["labels"].split("|"))
            rows[row["image"]] = set(row["labels"].split("|"))
    assert len(rows) == stats["images"] == stats["train"] + stats["test"] == 8
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(Path(i).name for i in rows)
    counts = {}
    for labs in rows.values():
        for lab in labs:
            counts[lab] = counts.get(lab, 0) + 1
    # dog_a's link in flowers/ adds the folder's labels to the same (one) image.
    # Parents are implied: dog -> mammal -> animal, car -> vehicle, flower -> plant.
    assert counts == {"dog": 2, "mammal": 2, "animal": 2, "car": 4, "vehicle": 4, "flower": 3,
                      "plant": 3}
    assert stats["label_counts"] == counts and stats["labels"] == 7


def test_bad_files_are_counted_not_fatal(built: tuple[Path, dict]) -> None:
    skipped = built[1]["skipped"]
    assert skipped["parse error"] == 2  # broken XML and the entity bomb
    assert skipped["duplicate content"] == 1
    assert skipped["blank render"] == 1
    assert skipped["no label"] == 2  # only meta tags; a label on one image only
    assert built[1]["source_svg_files"] == len(FILES) + 1


def test_white_background_and_aspect(built: tuple[Path, dict]) -> None:
    out = built[0]
    sizes = set()
    for png in (out / "images").iterdir():
        image = Image.open(png)
        assert image.mode == "RGB" and max(image.size) == 32
        sizes.add(image.size)
    assert {(32, 8), (8, 32), (32, 32)} <= sizes
    wide = next(Image.open(p) for p in (out / "images").iterdir() if Image.open(p).size == (32, 8))
    assert wide.getpixel((0, 0)) == (255, 255, 255) and wide.getpixel((16, 4)) == (0, 0, 0)


def test_splits_valid(built: tuple[Path, dict]) -> None:
    out, stats = built
    unseen = []
    for name in ("default", "second"):
        split = json.loads((out / "splits" / f"{name}.json").read_text())
        assert not set(split["seen"]) & set(split["unseen"]) and split["seen"]
        assert sorted(split["seen"] + split["unseen"]) == sorted(stats["label_counts"])
        unseen.append(set(split["unseen"]))
    assert unseen[0] and unseen[1] and unseen[0] != unseen[1]


def test_label_splits_take_a_quarter_of_the_well_tested_labels_and_avoid_earlier_draws_unless_asked() -> None:
    labels = [f"l{i:02d}" for i in range(20)]
    test_labels = [set(labels[:16])] * MIN_TEST_POSITIVES + [set(labels)]  # l16-l19: 1 test positive each
    seeds = {"a": 0, "b": 1, "c": 2, "d": 3}
    apart = label_splits(test_labels, labels, seeds)
    drawn = [set(split.unseen) for split in apart.values()]
    assert all(len(unseen) == 4 and unseen <= set(labels[:16]) for unseen in drawn)
    assert set().union(*drawn) == set(labels[:16])  # 4 draws of 4 of the 16 well-tested labels: no overlap
    alone = label_splits(test_labels, labels, seeds, overlap=True)
    assert alone["a"] == apart["a"] and alone != apart
    assert [label_splits(test_labels, labels, {"x": n})["x"] for n in range(4)] == list(alone.values())
    assert all(sorted(split.seen + split.unseen) == labels for split in alone.values())


def test_deterministic_and_replaces_earlier_build(source: Path, built: tuple[Path, dict],
                                                  tmp_path: Path) -> None:
    out = tmp_path / "again"
    for _ in range(2):  # the second build replaces the first in place
        build_openclipart(out, source=source, image_size=32, min_images=2, progress=False)
    files = sorted(p.relative_to(built[0]) for p in built[0].rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    for rel in files:
        assert (out / rel).read_bytes() == (built[0] / rel).read_bytes(), rel
    assert [p.name for p in tmp_path.iterdir()] == ["again"]  # no partial folders left


def test_user_errors(source: Path, tmp_path: Path) -> None:
    with pytest.raises(ClipDecoderError, match="not found"):
        build_openclipart(tmp_path / "x", source=tmp_path / "missing", progress=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ClipDecoderError, match="refusing"):
        build_openclipart(tmp_path / "mine", source=source, progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_failed_build_leaves_nothing(source: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import clip_decoder.data.openclipart as oc

    def boom(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(oc, "_finish", boom)
    with pytest.raises(KeyboardInterrupt):
        build_openclipart(tmp_path / "oc", source=source, image_size=32, min_images=2, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_missing_default_source_names_the_package_and_installs_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    import clip_decoder.data.openclipart as oc

    def no_subprocess(*args: object, **kwargs: object) -> None:
        raise AssertionError("the builder must not run a subprocess (apt-get)")

    monkeypatch.setattr(oc, "DEFAULT_SOURCE", tmp_path / "no-such-folder")
    monkeypatch.setattr(subprocess, "run", no_subprocess)
    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    with pytest.raises(ClipDecoderError, match="openclipart-svg") as error:
        build_openclipart(tmp_path / "oc", progress=False)
    assert "apt-get install openclipart-svg" in str(error.value) and "make system-packages" in str(error.value)
    assert "--source" in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_tag_tables_load_as_python_types() -> None:
    from clip_decoder.data import openclipart_tags as tags

    assert isinstance(tags.STOP_TAGS, frozenset) and "magick" in tags.STOP_TAGS
    assert isinstance(tags.SYNONYMS, dict) and tags.SYNONYMS["automobile"] == "car"
    assert isinstance(tags.FOLDER_LABELS, dict) and tags.FOLDER_LABELS["housecats"] == "cat"
    assert tags.IMPLIES["cat"] == ("mammal",) and all(isinstance(p, tuple) for p in tags.IMPLIES.values())
    assert tags.with_parents({"penguin"}) == {"penguin", "bird", "animal"}


def test_hung_or_crashing_render_is_skipped_not_waited_for(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import signal
    import time

    from clip_decoder.data import svg_render

    real = svg_render.render_svg

    def render(src: Path, dst: Path, size: int) -> str | None:
        if src.name == "hang.svg":
            while True:  # a file cairo never finishes: only killing the worker ends it
                time.sleep(1)
        if src.name == "crash.svg":
            os.kill(os.getpid(), signal.SIGKILL)  # dies like a crash inside cairo would
        return real(src, dst, size)

    monkeypatch.setattr(svg_render, "render_svg", render)  # the forked workers inherit the patch
    names = ["ok.svg", "hang.svg", "crash.svg", "blank.svg"]
    bodies = {"blank.svg": svg(["x"], "")}
    for name in names:
        (tmp_path / name).write_text(bodies.get(name, svg(["x"])))
    jobs = [(tmp_path / name, tmp_path / f"{name}.png", 16) for name in names]
    start = time.monotonic()
    results = svg_render.render_all(jobs, workers=2, timeout=1.0, progress=False)
    assert time.monotonic() - start < 30
    assert results == [None, "render timeout", "render error", "blank render"]
    assert Image.open(tmp_path / "ok.svg.png").size == (16, 16)
    assert usable_cpus() >= 1
