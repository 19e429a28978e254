"""Batched, on-device image transforms: uint8 batches in, normalised float32 batches out."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .datasets import ImageDataset

# Datasets trained with random crop (pad 4) + horizontal flip when augmentation is on.
_AUGMENTED = ("cifar10", "cifar100", "cinic10")


class BatchTransform:
    """uint8 [B,C,H,W] -> float32 (x/255 - mean)/std, with optional random crop and flip.

    Augmentation follows torchvision's RandomCrop(padding=p) then RandomHorizontalFlip: the
    padding is black (pixel value 0) before normalisation. Random numbers come from `generator`
    in this order: crop row offsets [B], crop column offsets [B], flip coin flips [B].
    """

    def __init__(self, mean, std, *, crop_padding: int = 0, flip: bool = False):
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        if crop_padding < 0:
            raise ValueError(f"crop_padding={crop_padding} must be >= 0")
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.crop_padding = int(crop_padding)
        self.flip = bool(flip)

    def __repr__(self) -> str:
        return (f"BatchTransform(mean={self.mean}, std={self.std}, "
                f"crop_padding={self.crop_padding}, flip={self.flip})")

    def __call__(self, x_uint8: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if x_uint8.dim() != 4 or x_uint8.shape[1] != len(self.mean):
            raise ValueError(f"expected a [B,{len(self.mean)},H,W] batch, got {list(x_uint8.shape)}")
        x = x_uint8
        if self.crop_padding > 0:
            x = self._random_crop(x, generator)
        if self.flip:
            heads = _rand((x.shape[0],), generator, x.device) < 0.5
            x = torch.where(heads[:, None, None, None], x.flip(3), x)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device)[None, :, None, None]
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device)[None, :, None, None]
        return (x.to(torch.float32) / 255.0 - mean) / std

    def _random_crop(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.crop_padding
        padded = F.pad(x, (p, p, p, p))  # zeros, on the uint8 pixels
        dy = _randint(2 * p + 1, (b,), generator, x.device)
        dx = _randint(2 * p + 1, (b,), generator, x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # [B,1,H,1]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # [B,1,1,W]
        batch = torch.arange(b, device=x.device)[:, None, None, None]
        chan = torch.arange(c, device=x.device)[None, :, None, None]
        return padded[batch, chan, rows, cols]


def _gen_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    # A generator can only draw on its own device; the result is then moved to the batch's.
    return generator.device if generator is not None else device


def _randint(high: int, size: tuple[int, ...], generator, device) -> torch.Tensor:
    return torch.randint(0, high, size, generator=generator,
                         device=_gen_device(generator, device)).to(device)


def _rand(size: tuple[int, ...], generator, device) -> torch.Tensor:
    return torch.rand(size, generator=generator, device=_gen_device(generator, device)).to(device)


def _tokens(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    return x


def train_transform(ds: ImageDataset, augment: bool) -> BatchTransform:
    """Training transform: CIFAR-style crop (pad 4) + flip when `augment`; Fashion-MNIST normalises only; token
    ids pass unchanged."""
    if getattr(ds, "seq_len", None) is not None:
        return _tokens
    if augment and ds.name in _AUGMENTED:
        return BatchTransform(ds.mean, ds.std, crop_padding=4, flip=True)
    return BatchTransform(ds.mean, ds.std)


def eval_transform(ds: ImageDataset) -> BatchTransform:
    """Evaluation transform: normalisation only."""
    if getattr(ds, "seq_len", None) is not None:
        return _tokens
    return BatchTransform(ds.mean, ds.std)
