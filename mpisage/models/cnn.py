"""Small CNN split ("cnn"): the project's default model, sized for a 2-core CPU.

Client: conv(16) + BN + ReLU + maxpool  -> smashed [16, s/2, s/2]
Server: conv(32) + BN + ReLU + maxpool + fc(128) + fc(num_classes)
Widths are what 11 ranks on 2 cores afford: the S-server's conv is the serial work of every round (a 32/64-wide
version spent ~25 core-seconds per round on the S-server alone, for no accuracy gain on Fashion-MNIST).
Aux variants (z -> logits):
  linear  : avgpool(2) + fc(num_classes)
  default : avgpool(2) + fc(64) + ReLU + fc(num_classes)   (cheap: it is double-backpropagated a lot)
  half    : same architecture as "default" (the CNN server is too small to halve meaningfully)
  full    : same architecture as the server (fresh weights)
PyTorch default initialisation throughout.
"""
import torch.nn as nn

IMAGE_SIZES = (28, 32)
CUT_CHANNELS = 16
SERVER_CHANNELS = 32


def _client(in_channels: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, CUT_CHANNELS, 3, padding=1),
        nn.BatchNorm2d(CUT_CHANNELS),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


def _server(image_size: int, num_classes: int) -> nn.Module:
    side = image_size // 4
    return nn.Sequential(
        nn.Conv2d(CUT_CHANNELS, SERVER_CHANNELS, 3, padding=1),
        nn.BatchNorm2d(SERVER_CHANNELS),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(SERVER_CHANNELS * side * side, 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


def _aux(variant: str, image_size: int, num_classes: int) -> nn.Module:
    side = image_size // 4
    if variant == "full":
        return _server(image_size, num_classes)
    if variant == "linear":
        return nn.Sequential(nn.AvgPool2d(2), nn.Flatten(), nn.Linear(CUT_CHANNELS * side * side, num_classes))
    # "default" and "half" share one architecture.
    return nn.Sequential(
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(CUT_CHANNELS * side * side, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )


def build(*, in_channels: int, image_size: int, num_classes: int, aux: str):
    """Returns fresh (client, server, aux) modules; arguments are validated by the caller except image_size."""
    if image_size not in IMAGE_SIZES:
        raise ValueError(f"model 'cnn' does not support image_size={image_size!r}; allowed: {IMAGE_SIZES}")
    return (_client(in_channels), _server(image_size, num_classes), _aux(aux, image_size, num_classes))
