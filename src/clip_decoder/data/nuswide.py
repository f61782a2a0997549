"""Convert NUS-WIDE (the NUS distribution, or ML-Decoder's single CSV) to the dataset-folder contract.

Zero-shot protocol of Huynh & Elhamifar (LESA, CVPR 2020), used by ML-Decoder and CLIP-Decoder:
the 81 ground-truth concepts are unseen; the 1000 Flickr tags of ``TagList1k.txt`` that are not
concept names (by the same string) are seen, 925 in the real data. Training images get their
seen tags; test images get their seen tags plus their concept ground truth (GZSL: 1006 labels).
Images without any label are kept with an empty label field. Whether an image exists on disk is
not checked here: the training pipeline reports unreadable images.
"""

from __future__ import annotations

import ast
import csv
import json
from importlib import resources
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..errors import ClipDecoderError
from .folder import LabelSplit, Row, write_folder

_WHITESPACE = b" \t\r\n\v\f"
# ML-Decoder's CSV names its test part "val".
CSV_PARTS = {"train": "train", "val": "test", "test": "test"}


def packaged_unseen() -> tuple[str, ...]:
    """The 81 NUS-WIDE concepts, the unseen labels of the zero-shot protocol."""
    text = resources.files(__package__).joinpath("nuswide-81-unseen.json").read_text(encoding="utf-8")
    return tuple(json.loads(text)["unseen"])


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as error:
        raise ClipDecoderError(f"NUS-WIDE {what} {path} does not exist") from error
    except OSError as error:
        raise ClipDecoderError(f"NUS-WIDE {what} {path}: cannot read ({error})") from error


def _read_lines(path: Path, what: str) -> list[str]:
    """The non-blank lines of a text file, stripped."""
    data = _read_bytes(path, what)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = data.decode("latin-1")  # decodes any bytes: a stray non-UTF-8 byte cannot stop the conversion
    return [line for line in map(str.strip, text.splitlines()) if line]


def _check_rows(path: Path, rows: int, list_path: Path, images: int) -> None:
    if rows != images:
        raise ClipDecoderError(f"{path} has {rows} rows but {list_path} lists {images} images")


def _parse_row(line: bytes, n: int) -> np.ndarray | None:
    """The n 0/1 cells of a whitespace-separated row as booleans, or None when the row is not that."""
    values = line.translate(None, _WHITESPACE)
    stripped = line.strip()
    # Fast path for the real files (single-digit cells, one tab between them): ~10x faster than split.
    single_digits = len(values) == n and not values.strip(b"01")
    if single_digits and len(stripped) == 2 * n - 1 and not stripped[1::2].strip(_WHITESPACE):
        return np.frombuffer(values, dtype=np.uint8) == ord("1")
    cells = line.split()
    if len(cells) != n or not set(cells) <= {b"0", b"1"}:
        return None
    return np.array(cells) == b"1"


def _tag_labels(
    path: Path, names: tuple[str, ...], keep: np.ndarray, list_path: Path, images: int
) -> list[tuple[str, ...]]:
    """Per row of a 0/1 tag matrix, the names of its set columns among ``keep`` (indices into ``names``)."""
    kept = [names[i] for i in keep]
    labels = []
    rows = 0
    try:
        f = path.open("rb")
    except FileNotFoundError as error:
        raise ClipDecoderError(f"NUS-WIDE tag matrix {path} does not exist") from error
    with f, tqdm(total=images, desc=path.name, unit=" rows", disable=None) as bar:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            rows += 1
            bar.update()
            if rows > images:
                continue  # only counted, for the error below
            row = _parse_row(line, len(names))
            if row is None:
                raise ClipDecoderError(
                    f"{path}, line {number}: expected {len(names)} values 0 or 1 (one per tag), "
                    f"got {len(line.split())} cells {line[:80]!r}"
                )
            labels.append(tuple(kept[j] for j in np.flatnonzero(row[keep])))
    _check_rows(path, rows, list_path, images)
    return labels


def _concept_labels(folder: Path, concepts: tuple[str, ...], part: str, list_path: Path, images: int) -> np.ndarray:
    """0/1 matrix (images, concepts) from ``Labels_<concept>_<part>.txt``."""
    columns = []
    for concept in tqdm(concepts, desc=f"{part} ground truth", unit=" concepts", disable=None):
        path = folder / f"Labels_{concept}_{part}.txt"
        cells = _read_bytes(path, "ground-truth file").split()
        _check_rows(path, len(cells), list_path, images)
        if not set(cells) <= {b"0", b"1"}:
            bad = next(i for i, cell in enumerate(cells) if cell not in (b"0", b"1"))
            raise ClipDecoderError(f"{path}, row {bad + 1}: expected 0 or 1, got {cells[bad].decode('latin-1')!r}")
        columns.append(np.array(cells) == b"1")
    return np.stack(columns, axis=1)


def convert_nuswide(root: str | Path, out: str | Path, images: str | Path | None = None) -> dict[str, int]:
    """Convert NUS-WIDE as distributed by NUS (under ``root``) to a dataset folder in ``out``; return images per part.

    Reads ``ImageList/{Train,Test}Imagelist.txt``, ``NUS_WID_Tags/TagList1k.txt`` and
    ``{Train,Test}_Tags1k.dat``, ``Concepts81.txt`` (or ``ConceptsList/Concepts81.txt``) and
    ``Groundtruth/TrainTestLabels/Labels_<concept>_Test.txt``. An image is the list's
    ``folder\\file.jpg`` (the last two parts, so a ``C:\\ImageData\\Flickr\\`` prefix is dropped)
    under ``images`` (default ``root/Flickr``).
    """
    root = Path(root)
    images = root / "Flickr" if images is None else Path(images)
    tag_list = root / "NUS_WID_Tags" / "TagList1k.txt"
    tags = tuple(_read_lines(tag_list, "tag list"))
    candidates = (root / "Concepts81.txt", root / "ConceptsList" / "Concepts81.txt")
    concepts_path = next((path for path in candidates if path.is_file()), None)
    if concepts_path is None:
        raise ClipDecoderError(f"NUS-WIDE concept list {candidates[0]} (or ConceptsList/Concepts81.txt) does not exist")
    concepts = tuple(dict.fromkeys(_read_lines(concepts_path, "concept list")))
    unseen = set(concepts)
    seen_columns = np.array([i for i, tag in enumerate(tags) if tag not in unseen], dtype=np.intp)
    if not len(seen_columns):
        raise ClipDecoderError(f"every tag of {tag_list} is a concept of {concepts_path}: no seen label to train on")
    split = LabelSplit(seen=tuple(dict.fromkeys(tags[i] for i in seen_columns)), unseen=concepts)
    parts: dict[str, list[Row]] = {}
    for part in ("Train", "Test"):
        list_path = root / "ImageList" / f"{part}Imagelist.txt"
        names = _read_lines(list_path, "image list")
        files = [images.joinpath(*name.replace("\\", "/").split("/")[-2:]) for name in names]
        if not files:
            raise ClipDecoderError(f"NUS-WIDE image list {list_path} lists no image")
        labels = _tag_labels(root / "NUS_WID_Tags" / f"{part}_Tags1k.dat", tags, seen_columns, list_path, len(files))
        if part == "Test":
            truth = _concept_labels(root / "Groundtruth" / "TrainTestLabels", concepts, part, list_path, len(files))
            labels = [seen + tuple(concepts[j] for j in np.flatnonzero(row)) for seen, row in zip(labels, truth)]
        parts[part.lower()] = list(zip(files, labels))
    return write_folder(out, parts, split)


def parse_label_list(cell: str) -> list[str]:
    """Label names from a list-valued cell: JSON, a Python literal, or ML-Decoder's unquoted ``[a, b]``."""
    text = cell.strip()
    if not text:
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        try:
            value = ast.literal_eval(text)  # literals only: never evaluates code
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            if not (text.startswith("[") and text.endswith("]")) or "'" in text or '"' in text:
                raise ClipDecoderError(f"not a list of label names: {cell[:200]!r}") from None
            value = text[1:-1].split(",")
    if not isinstance(value, (list, tuple)) or not all(isinstance(name, str) for name in value):
        raise ClipDecoderError(f"not a list of label names: {cell[:200]!r}")
    return list(dict.fromkeys(name.strip() for name in value if name.strip()))


def convert_nuswide_csv(
    csv_path: str | Path,
    out: str | Path,
    images: str | Path | None = None,
    split: LabelSplit | None = None,
) -> dict[str, int]:
    """Convert ML-Decoder's NUS-WIDE CSV to a dataset folder in ``out``; return images per part.

    The CSV (ML-Decoder's ``data.csv``, ASL's ``nus_wid_data.csv``) has a header row and three
    columns read by position: image path relative to ``images`` (default: the CSV's folder), a
    list of label names, and the part, ``train`` or ``val`` (``val`` is ML-Decoder's test set;
    ``test`` is accepted too). The default split takes the 81 concepts as unseen and every
    other label in the file as seen.
    """
    csv_path = Path(csv_path)
    images = csv_path.parent if images is None else Path(images)
    parts: dict[str, list[Row]] = {"train": [], "test": []}
    try:
        f = csv_path.open(newline="", encoding="utf-8-sig")
    except FileNotFoundError as error:
        raise ClipDecoderError(f"NUS-WIDE CSV {csv_path} does not exist") from error
    try:
        with f:
            reader = csv.reader(f)
            next(reader, None)  # header: columns are read by position, as ML-Decoder does
            for row in tqdm(reader, desc=csv_path.name, unit=" rows", disable=None):
                if not any(cell.strip() for cell in row):
                    continue
                where = f"{csv_path}, line {reader.line_num}"
                if len(row) != 3 or not row[0].strip():
                    raise ClipDecoderError(f"{where}: expected 3 columns (image, labels, split), got {row!r:.200}")
                part = CSV_PARTS.get(row[2].strip().lower())
                if part is None:
                    raise ClipDecoderError(f"{where}: split {row[2]!r} is not one of {', '.join(CSV_PARTS)}")
                try:
                    labels = parse_label_list(row[1])
                except ClipDecoderError as error:
                    raise ClipDecoderError(f"{where}: {error}") from None
                parts[part].append((images / row[0].strip(), labels))
    except (UnicodeDecodeError, csv.Error) as error:
        raise ClipDecoderError(f"{csv_path}: cannot read as UTF-8 CSV ({error})") from error
    if not parts["train"] or not parts["test"]:
        raise ClipDecoderError(f"{csv_path} has no {'train' if not parts['train'] else 'val or test'} rows")
    if split is None:
        unseen = packaged_unseen()
        found = {label for rows in parts.values() for _, labels in rows for label in labels}
        seen = sorted(found - set(unseen))
        if not seen:
            raise ClipDecoderError(
                f"{csv_path} has no label outside the 81 NUS-WIDE concepts, so nothing to train on: "
                "this looks like the 81-label file, not the zero-shot one (1006 labels)"
            )
        split = LabelSplit(seen=tuple(seen), unseen=unseen)
    return write_folder(out, parts, split)
