"""Training-time image transforms (the papers' only augmentation is a random horizontal flip)."""

from __future__ import annotations

import torch


class RandomHorizontalFlip:
    """Flip an (image, target) pair left-right with probability ``p`` (draws from torch's global RNG, so a
    restored RNG state replays the same flips)."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: torch.Tensor, target: dict):
        if torch.rand(1).item() < self.p:
            image = image.flip(-1)
            w = image.shape[-1]
            boxes = target["boxes"].clone()
            boxes[:, [0, 2]] = w - target["boxes"][:, [2, 0]]
            target = dict(target, boxes=boxes)
        return image, target
