"""ImageNet-style ResNet-18 split at layer2/layer3 ("resnet18"), as in the FSL-SAGE paper.

The 7x7 stride-2 stem + 3x3 stride-2 maxpool is kept unchanged for small (32x32) inputs.
Client: stem + layer1 + layer2           -> smashed [128, 4, 4] for 32x32 input
Server: layer3 + layer4 + avgpool + fc   -> logits
Aux variants (z -> logits):
  linear  : avgpool + fc(128 -> C)
  half    : layer3 with one BasicBlock (128->256, stride 2) + avgpool + fc(256 -> C)
  default : layer3 (two BasicBlocks, 128->256, stride 2) + avgpool + fc(256 -> C)
  full    : same architecture as the server
Init: Kaiming-normal (fan_out, relu) for every conv, BN weight 1 / bias 0, Linear PyTorch default.
No in-place ops anywhere, so every module supports double backward w.r.t. its input.
"""
import torch.nn as nn

IMAGE_SIZE_RANGE = (28, 64)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut (1x1 conv + BN when the shape changes), ReLU after the add."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.shortcut = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def _layer(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    return nn.Sequential(BasicBlock(in_planes, planes, stride), *[BasicBlock(planes, planes) for _ in range(blocks - 1)])


def _head(in_features: int, num_classes: int) -> list:
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_features, num_classes)]


def _init(module: nn.Module) -> nn.Module:
    # Re-initialise convs and BNs as the paper's reference does; Linear keeps PyTorch's default.
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module


def _client(in_channels: int) -> nn.Module:
    return _init(nn.Sequential(
        nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        _layer(64, 64, 2, 1),    # layer1
        _layer(64, 128, 2, 2),   # layer2
    ))


def _server(num_classes: int) -> nn.Module:
    return _init(nn.Sequential(_layer(128, 256, 2, 2), _layer(256, 512, 2, 2), *_head(512, num_classes)))


def _aux(variant: str, num_classes: int) -> nn.Module:
    if variant == "full":
        return _server(num_classes)
    if variant == "linear":
        return _init(nn.Sequential(*_head(128, num_classes)))
    blocks = 1 if variant == "half" else 2
    return _init(nn.Sequential(_layer(128, 256, blocks, 2), *_head(256, num_classes)))


def build(*, in_channels: int, image_size: int, num_classes: int, aux: str):
    """Returns fresh (client, server, aux) modules; arguments are validated by the caller except image_size."""
    lo, hi = IMAGE_SIZE_RANGE
    if not lo <= image_size <= hi:
        raise ValueError(f"model 'resnet18' does not support image_size={image_size!r}; allowed: {lo}..{hi}")
    return (_client(in_channels), _server(num_classes), _aux(aux, num_classes))


# ResNet-16 of the SGLR paper (CIFAR stem, widths 16/16/32/64, BasicBlocks [2, 2, 3]), split after layer2:
# client = conv3x3(16)+BN+ReLU, layer1, layer2 -> smashed [32, s/2, s/2]; server = layer3, avgpool, fc.
def build_resnet16(*, in_channels: int, image_size: int, num_classes: int, aux: str):
    if image_size % 4 or not 16 <= image_size <= 64:
        raise ValueError(f"model 'resnet16' does not support image_size={image_size!r}; allowed: 16..64, "
                         f"a multiple of 4 (Fashion-MNIST: dataset.image_size=32)")
    client = _init(nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                 _layer(16, 16, 2, 1), _layer(16, 32, 2, 2)))
    server = _init(nn.Sequential(_layer(32, 64, 3, 2), *_head(64, num_classes)))
    if aux == "full":
        aux_model = _init(nn.Sequential(_layer(32, 64, 3, 2), *_head(64, num_classes)))
    elif aux == "linear":
        aux_model = _init(nn.Sequential(*_head(32, num_classes)))
    else:
        aux_model = _init(nn.Sequential(_layer(32, 64, 1, 2), *_head(64, num_classes)))
    return client, server, aux_model
