"""The AlexNet-style split of GAS (the GAS paper, AAAI 2025, and its authors' code, github.com/eejiarong/GAS), no
BatchNorm ("alexnet").

Client: conv(3->32) maxpool ReLU conv(32->64) maxpool ReLU   -> smashed [64, s/4, s/4] (64x8x8 at 32, 64x7x7 at 28)
Server: conv(64->128) conv(128->256) conv(256->256) maxpool(3, 2) ReLU flatten fc(1024) fc(512) fc(classes)
As in the authors' net there is no ReLU between the server convs or between the linear layers.
Aux variants (z -> logits, for methods that need one): linear = flatten + fc; the others a small conv head.
"""
import torch.nn as nn

IMAGE_SIZES = (28, 32)


def _server_features(side: int) -> int:
    pooled = (side - 3) // 2 + 1       # MaxPool2d(3, stride 2) without padding
    return 256 * pooled * pooled


def build(*, in_channels: int, image_size: int, num_classes: int, aux: str):
    if image_size not in IMAGE_SIZES:
        raise ValueError(f"model 'alexnet' does not support image_size={image_size!r}; allowed: {IMAGE_SIZES}")
    side = image_size // 4
    client = nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.MaxPool2d(2), nn.ReLU())
    server = nn.Sequential(
        nn.Conv2d(64, 128, 3, padding=1), nn.Conv2d(128, 256, 3, padding=1), nn.Conv2d(256, 256, 3, padding=1),
        nn.MaxPool2d(3, 2), nn.ReLU(), nn.Flatten(),
        nn.Linear(_server_features(side), 1024), nn.Linear(1024, 512), nn.Linear(512, num_classes))
    if aux == "linear":
        aux_model = nn.Sequential(nn.Flatten(), nn.Linear(64 * side * side, num_classes))
    else:
        aux_model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(64, num_classes))
    return client, server, aux_model
