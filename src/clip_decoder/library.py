"""``predict --out DIR``: tag a photo library into part files, resumably, each torchrun process its own share.

The inputs, numbered in order, are cut into parts of ``part_size`` images; part p belongs to process
p % world (torchrun's RANK and WORLD_SIZE; a lone process has them all): balanced by count, the same
split every time. A part is scored and written whole, atomically, as ``DIR/parts/part-<p>.jsonl`` (or
``.parquet``): one row per image, its input index, path, content key (sha256 of the file), scores and
decided labels, or for an image that could not be read, its error. ``DIR/run.json`` says what the run is
(model, labels, templates, decision, format, part size, inputs); the same command run again skips the
parts that exist, so no image is scored twice and none is lost, whichever process was killed; a DIR of
another run is refused. When the last part is written, ``DIR/results.jsonl`` (``.parquet``) joins them
in input order; ``read_results`` reads either.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from .atomic import write_file
from .caches import file_key
from .decisions import Decider
from .errors import ClipDecoderError
from .writers import result_record

RUN_FILE = "run.json"
FORMATS = ("jsonl", "parquet")
DEFAULT_PART_SIZE = 256  # images per part file: what a killed process may have to score again


def content_key(path: Path) -> str | None:
    """The file's content key (caches.file_key); None when it can no longer be read."""
    try:
        return file_key(path)
    except OSError:
        return None


class Library:
    """An output folder of ``predict --out``: its run description, its parts, and the merged results."""

    def __init__(self, folder: str | os.PathLike, fmt: str = "jsonl", part_size: int = DEFAULT_PART_SIZE) -> None:
        if fmt not in FORMATS:
            raise ClipDecoderError(f"unknown --out-format {fmt!r}; choose from {', '.join(FORMATS)}")
        if part_size < 1:
            raise ClipDecoderError(f"--part-size must be at least 1, got {part_size}")
        if fmt == "parquet":
            import pyarrow  # noqa: F401  (missing: one line naming it, before anything is written)
        self.folder, self.format, self.part_size = Path(folder), fmt, part_size

    def part_path(self, part: int) -> Path:
        return self.folder / "parts" / f"part-{part:08d}.{self.format}"

    @property
    def results_path(self) -> Path:
        return self.folder / f"results.{self.format}"

    def start(self, run: dict, rank: int) -> None:
        """Record ``run`` (what this run is; rank 0 writes it, the other ranks wait for it), or check that the folder's
        run is this one."""
        run = {**run, "format": self.format, "part_size": self.part_size}
        path = self.folder / RUN_FILE
        if rank > 0:
            _wait_for(path)
        if path.is_file():
            try:
                recorded = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as error:
                raise ClipDecoderError(f"{path}: not valid JSON ({error})") from error
            changed = [key for key in run if recorded.get(key) != run[key]]
            if changed:
                raise ClipDecoderError(f"--out {self.folder} holds another run (its {changed[0]} differs, {path}); choose"
                                       " a new folder, or run the same command to resume it")
            return
        if self.folder.exists() and any(self.folder.iterdir()):
            raise ClipDecoderError(f"--out {self.folder} is a folder that holds other files; choose an empty or new one")
        (self.folder / "parts").mkdir(parents=True, exist_ok=True)
        write_file(path, json.dumps(run, indent=2) + "\n")

    def part_count(self, count: int) -> int:
        """How many parts ``count`` inputs make."""
        return -(-count // self.part_size)

    def parts(self, count: int, rank: int, world: int) -> list[int]:
        """This process's parts not written yet."""
        return [part for part in range(rank, self.part_count(count), world) if not self.part_path(part).is_file()]

    def write_part(self, part: int, rows: list[dict], labels: Sequence[str]) -> None:
        """One part's rows, atomically."""
        if self.format == "jsonl":
            data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
        else:
            data = _parquet_bytes(rows, labels)
        write_file(self.part_path(part), data, fsync=False)

    def merge_if_complete(self, count: int, labels: Sequence[str]) -> bool:
        """Write the merged results once every part exists (any process may; the writes are atomic); each part is
        read back first, and one that does not hold its images is refused, naming it."""
        parts = range(self.part_count(count))
        if not all(self.part_path(part).is_file() for part in parts):
            return False
        tables = [self._read_part(part, count) for part in parts]
        if self.format == "jsonl":
            data = b"".join(tables)
        else:
            import pyarrow as pa

            data = _parquet_bytes([], labels, table=pa.concat_tables(tables))
        write_file(self.results_path, data)
        return True

    def _read_part(self, part: int, count: int):
        """One part, checked to hold its images: the file's bytes (JSON Lines) or its table (Parquet)."""
        path, first = self.part_path(part), part * self.part_size
        expected = list(range(first, min(first + self.part_size, count)))
        try:
            if self.format == "jsonl":
                table = path.read_bytes()
                indices = [json.loads(line)["index"] for line in table.decode("utf-8").splitlines()]
            else:
                import pyarrow.parquet as pq

                table = pq.read_table(path)
                indices = table.column("index").to_pylist()
        except Exception as error:  # json and pyarrow raise their own types for a damaged file
            raise ClipDecoderError(f"{path}: a damaged part file ({' '.join(str(error).split())[:200]}); delete it and"
                                   " run the same command again to score its images again") from error
        if indices != expected:
            raise ClipDecoderError(f"{path}: holds images {indices[:3]}..., not {expected[:3]}...; delete it and run the"
                                   " same command again")
        return table


def _parquet_bytes(rows: list[dict], labels: Sequence[str], table=None) -> bytes:
    """Rows as one Parquet file: index, image, content_key, scores (list in the run's label order, also in the
    schema's metadata), labels, error."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    if table is None:
        columns = {name: [row.get(name) for row in rows] for name in ("index", "image", "content_key", "error")}
        columns["scores"] = [None if "scores" not in row else [row["scores"][label] for label in labels] for row in rows]
        columns["labels"] = [row.get("labels") for row in rows]
        schema = pa.schema([("index", pa.int64()), ("image", pa.string()), ("content_key", pa.string()),
                            ("scores", pa.list_(pa.float32())), ("labels", pa.list_(pa.string())), ("error", pa.string())],
                           metadata={"labels": json.dumps(list(labels))})
        table = pa.table({field.name: columns[field.name] for field in schema}, schema=schema)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def read_results(folder: str | os.PathLike) -> Iterator[dict]:
    """The rows of a finished ``predict --out`` folder, in input order (JSON Lines or Parquet); a damaged file
    is one error naming it."""
    folder = Path(folder)
    for fmt in FORMATS:
        path = folder / f"results.{fmt}"
        if path.is_file():
            break
    else:
        raise ClipDecoderError(f"{folder} holds no results.jsonl or results.parquet: the run is not finished"
                               " (run the same command again to finish it)")
    try:
        if fmt == "jsonl":
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            labels = json.loads(table.schema.metadata[b"labels"])
            rows = [{key: value for key, value in row.items() if value is not None} for row in table.to_pylist()]
            for row in rows:
                if "scores" in row:
                    row["scores"] = dict(zip(labels, row["scores"]))
    except Exception as error:  # json and pyarrow raise their own types for a damaged file
        raise ClipDecoderError(f"{path}: not readable results ({error})") from error
    yield from rows


def process_rank() -> tuple[int, int]:
    """(rank, world size) as torchrun set them; (0, 1) for a lone process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def tag_library(tagger, paths: Sequence[Path], labels: list[str], decider: Decider, library: Library,
                templates=None, batch_size: int = 8, report=print) -> tuple[int, int]:
    """Score this process's parts that are not written yet into ``library`` (started); returns (images scored,
    failures). ``report`` gets each unreadable image's message."""
    rank, world = process_rank()
    scored = failures = 0
    for part in library.parts(len(paths), rank, world):
        start = part * library.part_size
        chunk = list(paths[start : start + library.part_size])
        rows: list[dict] = [{} for _ in chunk]
        for batch in tagger.predict_batches(chunk, labels, templates, batch_size=batch_size):
            for index, message in batch.failed.items():
                rows[index] = {"index": start + index, "image": str(chunk[index]), "error": message}
                failures += 1
                report(message)
            for index, scores in zip(batch.indices, batch.scores):
                record = result_record(str(chunk[index]), labels, scores, decider(labels, scores))
                rows[index] = {"index": start + index, **record, "content_key": content_key(chunk[index])}
                scored += 1
        library.write_part(part, rows, labels)
    library.merge_if_complete(len(paths), labels)
    return scored, failures


def _wait_for(path: Path, seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    while not path.is_file():
        if time.monotonic() > deadline:
            raise ClipDecoderError(f"{path} was not written by rank 0 within {seconds:.0f} s")
        time.sleep(0.1)


def add_out_options(parser) -> None:
    """predict's --out, --out-format and --part-size (on an argparse parser)."""
    parser.add_argument("--out", metavar="DIR", help="write the results into DIR as part files instead of stdout: the"
                        " same command resumes, each torchrun process takes its share (README, Tagging a library)")
    parser.add_argument("--out-format", choices=FORMATS, default="jsonl", help="with --out: jsonl (default) or parquet")
    parser.add_argument("--part-size", type=int, default=DEFAULT_PART_SIZE, metavar="N",
                        help=f"with --out: images per part file (default {DEFAULT_PART_SIZE})")
