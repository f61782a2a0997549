"""NUS-WIDE (the NUS distribution and ML-Decoder's CSV) to the dataset-folder contract, on tiny replicas."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clip_decoder import ClipDecoderError
from clip_decoder.data.folder import LabelSplit, read_part, read_split
from clip_decoder.data.nuswide import convert_nuswide, convert_nuswide_csv, packaged_unseen, parse_label_list

TAGS = ("nikon", "sky", "beach", "dog", "bw", "sunset")
CONCEPTS = ("beach", "dog", "sky", "zebra")  # zebra is not among the tags, as 6 of the real 81 are not
TRAIN = {  # Windows path in the list -> tag row
    "actor\\0001_2124494179.jpg": (1, 1, 0, 0, 1, 0),
    "beach\\0002_2345.jpg": (0, 0, 1, 1, 0, 0),
    "zebra\\0003_99.jpg": (0, 0, 0, 0, 0, 0),
}
TEST = {  # Windows path -> (tag row, concept ground truth in CONCEPTS order)
    "sky\\0004_1.jpg": ((0, 1, 0, 0, 0, 1), (0, 0, 0, 1)),  # tag sky without ground truth sky
    "dog\\0005_2.jpg": ((1, 0, 0, 0, 0, 0), (0, 1, 1, 0)),
    "zebra\\0006_3.jpg": ((0, 0, 0, 0, 0, 0), (0, 0, 0, 0)),
}


def write(path: Path, lines, end: str = "\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(f"{line}{end}" for line in lines).encode())


def tag_row(values, sep: str = "\t") -> str:
    return sep.join(map(str, values)) + sep  # the real .dat rows end with a tab


def replica(root: Path, tags=TAGS, concepts=CONCEPTS, train=TRAIN, test=TEST, concepts_file="Concepts81.txt",
            sep: str = "\t", end: str = "\r\n") -> Path:
    """The NUS files the converter reads, laid out as NUS distributes them."""
    write(root / "ImageList" / "TrainImagelist.txt", train, end)
    write(root / "ImageList" / "TestImagelist.txt", test, end)
    write(root / "NUS_WID_Tags" / "TagList1k.txt", tags, end)
    write(root / "NUS_WID_Tags" / "Train_Tags1k.dat", [tag_row(row, sep) for row in train.values()], end)
    write(root / "NUS_WID_Tags" / "Test_Tags1k.dat", [tag_row(row, sep) for row, _ in test.values()], end)
    write(root / concepts_file, concepts, end)
    truth = root / "Groundtruth" / "TrainTestLabels"
    for j, concept in enumerate(concepts):
        write(truth / f"Labels_{concept}_Test.txt", [t[j] for _, t in test.values()], end)
        # never read: the protocol labels training images by their tags only (the real lake file has a bad row)
        write(truth / f"Labels_{concept}_Train.txt", ["-1130179"] * len(train), end)
    return root


def labels_by_path(out: Path, part: str, root: Path) -> dict[str, set[str]]:
    return {s.image.resolve().relative_to(root.resolve()).as_posix(): set(s.labels) for s in read_part(out, part)}


def test_convert_nuswide_follows_the_zero_shot_protocol(tmp_path):
    root = replica(tmp_path / "NUS-WIDE")
    out = tmp_path / "folder"
    assert convert_nuswide(root, out) == {"train": 3, "test": 3}
    split = read_split(out / "split.json")
    assert split == LabelSplit(seen=("nikon", "bw", "sunset"), unseen=CONCEPTS)
    assert labels_by_path(out, "train", root) == {
        "Flickr/actor/0001_2124494179.jpg": {"nikon", "bw"},  # the user tag "sky" is a concept: dropped
        "Flickr/beach/0002_2345.jpg": set(),
        "Flickr/zebra/0003_99.jpg": set(),
    }
    assert labels_by_path(out, "test", root) == {
        "Flickr/sky/0004_1.jpg": {"sunset", "zebra"},  # concepts come from the ground truth, not the tags
        "Flickr/dog/0005_2.jpg": {"nikon", "dog", "sky"},
        "Flickr/zebra/0006_3.jpg": set(),
    }
    assert (out / "test.csv").read_text().splitlines()[2] == "../NUS-WIDE/Flickr/dog/0005_2.jpg,nikon|dog|sky"


def test_concepts_list_folder_space_separated_rows_an_images_folder_and_a_drive_prefix(tmp_path):
    train = {"C:\\ImageData\\Flickr\\" + name: row for name, row in TRAIN.items()}  # as in NUS-WIDE-urls.txt
    root = replica(tmp_path / "nus", train=train, concepts_file="ConceptsList/Concepts81.txt", sep="  ", end="\n")
    convert_nuswide(root, tmp_path / "out", images=tmp_path / "pictures")
    train = read_part(tmp_path / "out", "train")
    assert train[0].image.resolve() == (tmp_path / "pictures" / "actor" / "0001_2124494179.jpg").resolve()
    assert train[0].labels == ("nikon", "bw")


@pytest.mark.parametrize("missing", [
    "ImageList/TestImagelist.txt", "NUS_WID_Tags/TagList1k.txt", "NUS_WID_Tags/Train_Tags1k.dat",
    "Concepts81.txt", "Groundtruth/TrainTestLabels/Labels_zebra_Test.txt",
])
def test_a_missing_file_is_named(tmp_path, missing):
    root = replica(tmp_path)
    (root / missing).unlink()
    with pytest.raises(ClipDecoderError, match=f"{Path(missing).name}.* does not exist"):
        convert_nuswide(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("file, lines, message", [
    ("NUS_WID_Tags/Test_Tags1k.dat", [tag_row(row) for row, _ in list(TEST.values())[:2]],
     r"Test_Tags1k.dat has 2 rows but .*TestImagelist.txt lists 3 images"),
    ("NUS_WID_Tags/Train_Tags1k.dat", [tag_row(row) for row in TRAIN.values()] * 2,
     r"Train_Tags1k.dat has 6 rows but .*TrainImagelist.txt lists 3 images"),
    ("Groundtruth/TrainTestLabels/Labels_dog_Test.txt", [0, 1, 0, 0],
     r"Labels_dog_Test.txt has 4 rows but .*TestImagelist.txt lists 3 images"),
    ("Groundtruth/TrainTestLabels/Labels_dog_Test.txt", [0, 2, 0],
     r"Labels_dog_Test.txt, row 2: expected 0 or 1, got '2'"),
    ("NUS_WID_Tags/Train_Tags1k.dat", [tag_row(TRAIN["actor\\0001_2124494179.jpg"]), "0 1 0 0 1", tag_row([0] * 6)],
     r"Train_Tags1k.dat, line 2: expected 6 values 0 or 1 \(one per tag\), got 5 cells"),
    ("NUS_WID_Tags/Train_Tags1k.dat", [tag_row([0] * 6), "0\t1\t0\t0\t10\t", tag_row([0] * 6)],
     r"Train_Tags1k.dat, line 2: expected 6 values"),
    ("NUS_WID_Tags/TagList1k.txt", ["nikon", "bw"], r"Train_Tags1k.dat, line 1: expected 2 values"),
    ("Concepts81.txt", TAGS, r"every tag of .*TagList1k.txt is a concept"),
])
def test_mismatched_and_bad_rows_name_the_file(tmp_path, file, lines, message):
    root = replica(tmp_path)
    write(root / file, lines)
    for concept in TAGS:  # ground truth for the concept list written by the last case
        if not (root / "Groundtruth" / "TrainTestLabels" / f"Labels_{concept}_Test.txt").exists():
            write(root / "Groundtruth" / "TrainTestLabels" / f"Labels_{concept}_Test.txt", [0] * len(TEST))
    with pytest.raises(ClipDecoderError, match=message):
        convert_nuswide(root, tmp_path / "out")


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_random_tag_matrices_round_trip(data):
    n_tags = data.draw(st.integers(1, 7), label="tags")
    tags = tuple(f"t{i}" for i in range(n_tags))
    concepts = tuple(data.draw(st.lists(st.sampled_from(tags + ("c0", "c1")), min_size=1, unique=True)))
    n_train, n_test = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 5))
    bits = st.lists(st.integers(0, 1), min_size=n_tags, max_size=n_tags).map(tuple)
    truth_bits = st.lists(st.integers(0, 1), min_size=len(concepts), max_size=len(concepts)).map(tuple)
    train = {f"d{i % 2}\\tr{i}.jpg": data.draw(bits) for i in range(n_train)}
    test = {f"d{i % 2}\\te{i}.jpg": (data.draw(bits), data.draw(truth_bits)) for i in range(n_test)}
    sep, end = data.draw(st.sampled_from([("\t", "\n"), ("\t", "\r\n"), (" ", "\n"), ("\t \t", "\n")]))
    seen = tuple(t for t in tags if t not in concepts)
    with tempfile.TemporaryDirectory() as tmp:
        root = replica(Path(tmp) / "nus", tags, concepts, train, test, sep=sep, end=end)
        if not seen:
            with pytest.raises(ClipDecoderError, match="no seen label"):
                convert_nuswide(root, Path(tmp) / "out")
            return
        convert_nuswide(root, Path(tmp) / "out")
        assert read_split(Path(tmp) / "out" / "split.json") == LabelSplit(seen, concepts)
        def seen_tags(row):
            return {t for t, b in zip(tags, row) if b and t in seen}

        expect_train = {name.replace("\\", "/"): seen_tags(row) for name, row in train.items()}
        expect_test = {name.replace("\\", "/"): seen_tags(row) | {c for c, b in zip(concepts, truth) if b}
                       for name, (row, truth) in test.items()}
        assert labels_by_path(Path(tmp) / "out", "train", root / "Flickr") == expect_train
        assert labels_by_path(Path(tmp) / "out", "test", root / "Flickr") == expect_test


CSV = """filename,label,split
images/0001_2124494179.jpg,"['clouds', 'sky', 'nikon']",train
images/0002_2345.jpg,"[beach, sunset]",train
images/0003_99.jpg,[],val
images/0004_1.jpg,"[""dog"", ""canon""]",val
images/0005_2.jpg,"('zebra',)",test

"""


def test_convert_nuswide_csv_parses_each_list_form(tmp_path):
    (tmp_path / "nus").mkdir()
    (tmp_path / "nus" / "data.csv").write_text(CSV, encoding="utf-8")
    out = tmp_path / "out"
    assert convert_nuswide_csv(tmp_path / "nus" / "data.csv", out) == {"train": 2, "test": 3}
    assert labels_by_path(out, "train", tmp_path / "nus") == {
        "images/0001_2124494179.jpg": {"clouds", "sky", "nikon"}, "images/0002_2345.jpg": {"beach", "sunset"}}
    assert labels_by_path(out, "test", tmp_path / "nus") == {
        "images/0003_99.jpg": set(), "images/0004_1.jpg": {"dog", "canon"}, "images/0005_2.jpg": {"zebra"}}
    assert read_split(out / "split.json") == LabelSplit(seen=("canon", "nikon"), unseen=packaged_unseen())
    custom = LabelSplit(seen=("nikon",), unseen=("sky",))
    convert_nuswide_csv(tmp_path / "nus" / "data.csv", out, images=tmp_path / "elsewhere", split=custom)
    assert read_split(out / "split.json") == custom
    first = read_part(out, "train")[0].image
    assert first.resolve() == (tmp_path / "elsewhere" / "images" / "0001_2124494179.jpg").resolve()


def test_packaged_unseen_are_the_81_concepts():
    unseen = packaged_unseen()
    assert len(set(unseen)) == 81 and {"airport", "sky", "zebra", "whales", "nighttime"} <= set(unseen)


@pytest.mark.parametrize("cell, labels", [
    ("['a', 'b c', 'a']", ["a", "b c"]), ('["x"]', ["x"]), ("[a,  b ]", ["a", "b"]), ("[]", []), ("", []),
    ("[\"o'neil\", 'y']", ["o'neil", "y"]),
])
def test_parse_label_list(cell, labels):
    assert parse_label_list(cell) == labels


@pytest.mark.parametrize("cell", [
    "__import__('os').system('touch pwned')", "[__import__('os').system('touch pwned')]", "sky",
    "[1, 2]", "{'a'}", "['a', ", "'a'",
])
def test_parse_label_list_rejects_what_is_not_a_list_of_names(cell, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ClipDecoderError, match="not a list of label names"):
        parse_label_list(cell)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("rows, message", [
    ("a.jpg,[sky],holdout\n", r"data.csv, line 2: split 'holdout' is not one of train, val, test"),
    ("a.jpg,[sky]\n", r"data.csv, line 2: expected 3 columns"),
    ('a.jpg,"[1, 2]",train\n', r"data.csv, line 2: not a list of label names"),
    ("a.jpg,\"['sky', 'clouds']\",train\nb.jpg,[],val\n", "no label outside the 81 NUS-WIDE concepts"),
    ("a.jpg,[nikon],train\n", r"data.csv has no val or test rows"),
    ("a.jpg,[nikon],val\n", r"data.csv has no train rows"),
])
def test_bad_csv_rows_name_file_and_line(tmp_path, rows, message):
    (tmp_path / "data.csv").write_text("filename,label,split\n" + rows, encoding="utf-8")
    with pytest.raises(ClipDecoderError, match=message):
        convert_nuswide_csv(tmp_path / "data.csv", tmp_path / "out")


def test_missing_csv_is_named(tmp_path):
    with pytest.raises(ClipDecoderError, match="nus_wid_data.csv does not exist"):
        convert_nuswide_csv(tmp_path / "nus_wid_data.csv", tmp_path / "out")


def test_cli_converts_both_nuswide_forms(tmp_path, capsys):
    from clip_decoder.cli import main

    root = replica(tmp_path / "NUS-WIDE")
    assert main(["data", "nuswide", "--root", str(root), "--out", str(tmp_path / "a")]) == 0
    assert labels_by_path(tmp_path / "a", "test", root)["Flickr/dog/0005_2.jpg"] == {"nikon", "dog", "sky"}
    (tmp_path / "nus").mkdir()
    (tmp_path / "nus" / "data.csv").write_text(CSV, encoding="utf-8")
    assert main(["data", "nuswide-csv", "--csv", str(tmp_path / "nus" / "data.csv"), "--out", str(tmp_path / "b")]) == 0
    assert "train.csv 2 images, test.csv 3 images" in capsys.readouterr().out
    assert read_split(tmp_path / "b" / "split.json").unseen == packaged_unseen()
