"""Training data: cached features of frozen towers, or decoded images when the tower trains."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..data.folder import Sample, target_matrix
from ..decoding import DEFAULT_WORKERS, decoded_batches
from ..distributed import World
from ..encoders import TextTower
from ..errors import ClipDecoderError
from ..features import FeatureSource, StoredRows
from ..images import Preprocess
from ..prompts import describe


class LabelledImages:
    """Targets and sentences of a list of samples (shared by the two kinds of training data)."""

    samples: list[Sample]

    def targets(self, labels: tuple[str, ...], rows: torch.Tensor | None = None) -> torch.Tensor:
        """0/1 targets (n, len(labels)) of every sample, or of ``rows``; other labels are ignored."""
        samples = self.samples if rows is None else [self.samples[i] for i in rows.tolist()]
        return torch.from_numpy(target_matrix(samples, labels))

    def sentences(self, labels: tuple[str, ...]) -> list[str]:
        """Each image's sentence naming its labels among ``labels``, for the alignment loss."""
        names = set(labels)
        return [describe([label for label in sample.labels if label in names]) for sample in self.samples]


@dataclass
class FeatureSet(LabelledImages):
    """Features of the samples that could be read: the frozen-tower training data.

    From a ``FeatureCache`` the tokens and pooled vectors are tensors in memory; from a
    ``FeatureStore`` they are ``StoredRows``, read from the store's shards a batch at a time.
    """

    tokens: torch.Tensor | StoredRows
    pooled: torch.Tensor | StoredRows
    samples: list[Sample]

    @classmethod
    def build(cls, samples: list[Sample], source: FeatureSource, progress: bool = True,
              world: World = World()) -> FeatureSet:
        """Features of ``samples``; under torchrun each rank extracts its share of the distinct
        files first, so every image goes through the tower once, then all ranks read them all
        (from a store: each rank maps them all and reads the rows it is given)."""
        paths = [s.image for s in samples]
        if world.size > 1:
            source.extract_missing(paths, world, progress=progress and world.is_main)  # failures: reported below
            world.barrier()
        features = source.get(paths, progress=progress and world.is_main, report=world.is_main)
        return cls(features.tokens, features.pooled, [samples[i] for i in features.kept])

    def batches(self, index_lists: Iterable[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(rows, tokens) for each list of row indices."""
        for rows in index_lists:
            yield rows, self.tokens[rows]


@dataclass
class ImageSet(LabelledImages):
    """Samples decoded from their files at every step: the data for training the image tower."""

    samples: list[Sample]
    preprocess: Preprocess
    decode_workers: int = DEFAULT_WORKERS  # threads decoding ahead (decoding.decode_workers: by the tower's device)

    @classmethod
    def build(cls, samples: list[Sample], preprocess: Preprocess, progress: bool = True, world: World = World(),
              decode_workers: int = DEFAULT_WORKERS) -> ImageSet:
        """Keep the samples whose image decodes (checked once, each rank its share), so that every
        step's batch has the size asked for on every rank."""
        failed = {}
        mine = world.shard(list(range(len(samples))))
        bar = tqdm(total=len(mine), desc="check images", unit="img", disable=not progress or not world.is_main)
        for batch in decoded_batches([samples[i].image for i in mine], preprocess, workers=decode_workers):
            failed.update({mine[k]: message for k, message in batch.failed.items()})
            bar.update(len(batch.indices) + len(batch.failed))
        bar.close()
        failed = {k: v for part in world.all_gather_objects(failed) for k, v in part.items()}
        if world.is_main:
            for index in sorted(failed):
                print(f"error: {failed[index]}", file=sys.stderr)
        kept = [sample for index, sample in enumerate(samples) if index not in failed]
        if not kept:
            raise ClipDecoderError(f"none of the {len(samples)} images could be read")
        return cls(kept, preprocess, decode_workers)

    def batches(self, index_lists: Iterable[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(rows, pixels) for each list of row indices, decoded one batch ahead."""
        index_lists = list(index_lists)
        flat = torch.cat(index_lists) if index_lists else torch.zeros(0, dtype=torch.long)
        size = len(index_lists[0]) if index_lists else 1
        for batch in decoded_batches([self.samples[i].image for i in flat.tolist()], self.preprocess, size,
                                     workers=self.decode_workers):
            if batch.failed:  # read fine when the run started: the file changed since
                raise ClipDecoderError(next(iter(batch.failed.values())))
            yield flat[batch.indices], torch.from_numpy(batch.pixels)


def encode_sentences(text_tower: TextTower, sentences: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings (distinct sentences, text_dim), each sentence's row in them): per-image sentences,
    each distinct sentence encoded and kept once."""
    unique = {sentence: row for row, sentence in enumerate(dict.fromkeys(sentences))}
    encoded = text_tower.encode(list(unique)).float().cpu()
    return encoded, torch.tensor([unique[sentence] for sentence in sentences], dtype=torch.long)
