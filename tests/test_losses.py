"""Asymmetric loss, the contrastive alignment loss, and that its parameters really train."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from clip_decoder.alignment import Alignment
from clip_decoder.training.losses import AsymmetricLoss, contrastive_loss


def test_asl_without_focusing_or_clipping_is_binary_cross_entropy_per_image():
    logits, targets = torch.randn(4, 6), torch.randint(0, 2, (4, 6)).float()
    expected = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / 4
    torch.testing.assert_close(AsymmetricLoss(gamma_neg=0, gamma_pos=0, clip=0)(logits, targets), expected)


def test_asl_hand_computed_values():
    loss = AsymmetricLoss(gamma_neg=4, gamma_pos=0, clip=0.05)
    # A negative at p = 0.5: shifted p_neg = min(0.5 + 0.05, 1) = 0.55, weight (1 - 0.55)^4.
    value = loss(torch.zeros(1, 1), torch.zeros(1, 1))
    torch.testing.assert_close(value, torch.tensor(-math.log(0.55) * 0.45**4))
    # An easy negative (p < clip) costs nothing; a positive at p = 0.5 costs log 2.
    assert loss(torch.full((1, 1), -5.0), torch.zeros(1, 1)) == 0
    torch.testing.assert_close(loss(torch.zeros(1, 1), torch.ones(1, 1)), torch.tensor(math.log(2)))


def test_masked_labels_count_neither_way():
    loss = AsymmetricLoss()
    logits = torch.randn(3, 5, requires_grad=True)
    targets = torch.randint(0, 2, (3, 5)).float()
    mask = torch.ones(3, 5)
    mask[:, 3:] = 0
    value = loss(logits, targets, mask)
    flipped = targets.clone()
    flipped[:, 3:] = 1 - flipped[:, 3:]
    torch.testing.assert_close(loss(logits, flipped, mask), value)
    value.backward()
    assert torch.all(logits.grad[:, 3:] == 0) and torch.all(logits.grad[:, :3] != 0)


def test_alignment_loss_prefers_matched_pairs_and_treats_shared_texts_alike():
    torch.manual_seed(0)
    alignment = Alignment(image_dim=8, text_dim=8, dim=8)
    with torch.no_grad():
        alignment.image_proj.weight.copy_(torch.eye(8))
        alignment.text_proj.weight.copy_(torch.eye(8))
        alignment.image_proj.bias.zero_()
        alignment.text_proj.bias.zero_()

    def align(images, texts):
        return contrastive_loss(alignment, images, texts)

    x = torch.randn(6, 8)
    matched, shuffled = align(x, x), align(x, x[torch.randperm(6)])
    assert matched < 0.01 < shuffled
    # Images sharing a sentence: the loss cannot tell which of them is "the" positive.
    images, texts = torch.randn(6, 8), torch.cat([x[:5], x[:1]])
    swapped = images[[5, 1, 2, 3, 4, 0]]
    torch.testing.assert_close(align(swapped, texts), align(images, texts))


def test_the_objective_is_the_recipes_weighted_sum_of_its_terms(tiny_clip_dir):
    from clip_decoder import CLIPDecoder
    from clip_decoder.training.config import TrainConfig
    from clip_decoder.training.methods import decoder_method

    model = CLIPDecoder.create(backbone=f"hf:{tiny_clip_dir}", dim=32, heads=4, ffn_dim=64, dropout=0.0)
    recipe = decoder_method("clip-decoder").recipe(TrainConfig(clip_weight=0.5))
    assert recipe.losses == {"cls": 1.0, "clip": 0.5} and recipe.trains == ("head", "alignment")
    out = recipe.objective(model)(torch.randn(4, 17, 24), torch.randn(3, 24), (torch.rand(4, 3) > 0.5).float(),
                                  torch.randn(4, 24))
    assert set(out) == {"loss", "cls", "clip"}
    assert out["loss"].item() == pytest.approx(out["cls"].item() + 0.5 * out["clip"].item(), rel=1e-6)
    assert decoder_method("ml-decoder").recipe(TrainConfig()).trains == ("head",)  # no alignment loss, none trained
