"""Split models: a client part, a server part and an auxiliary head that stands in for the server.

All parts output raw logits (no log_softmax); the loss everywhere is F.cross_entropy (mean).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from mpisage.runtime.state import state_nbytes

from . import alexnet, cnn, resnet

IMAGE_MODELS = ("cnn", "resnet18", "resnet16", "alexnet")
# GPT-2 + LoRA (mpisage.models.gpt2); built only with the optional extra installed: pip install -e .[llm]
LM_MODELS = ("gpt2_tiny", "gpt2_medium")
MODELS = IMAGE_MODELS + LM_MODELS
AUX_VARIANTS = ("linear", "half", "default", "full")
_BUILDERS = {"cnn": cnn.build, "resnet18": resnet.build, "resnet16": resnet.build_resnet16, "alexnet": alexnet.build}


@dataclass
class SplitModel:
    """client: x [B,C,H,W] -> smashed z; server: z -> logits; aux: z -> logits."""

    client: nn.Module
    server: nn.Module
    aux: nn.Module

    def whole(self) -> nn.Module:
        """client followed by server, sharing the same module objects (for evaluation)."""
        return nn.Sequential(self.client, self.server)


def build_split(name: str, *, in_channels: int | None = None, image_size: int | None = None, num_classes: int,
                aux: str = "default", lm=None, seq_len: int | None = None) -> SplitModel:
    """Builds fresh modules from torch's global RNG (the caller seeds it, identically on every rank).

    Image models take in_channels and image_size. GPT-2 models (LM_MODELS) take `lm`, an object with the fields
    of mpisage.config.LMConfig, num_classes = the vocabulary size (50257) and optionally
    seq_len (checked against GPT-2's 1024 positions); see mpisage.models.gpt2 for their parts and state_dict.

    Raises ValueError naming the bad value and the allowed ones for an unknown model name or aux variant,
    an unsupported image_size, or a non-positive in_channels / num_classes.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {MODELS}")
    if name in LM_MODELS:
        return _build_lm_split(name, num_classes=num_classes, aux=aux, lm=lm, seq_len=seq_len)
    if aux not in AUX_VARIANTS:
        raise ValueError(f"unknown aux variant {aux!r}; allowed: {AUX_VARIANTS}")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"unsupported in_channels={in_channels!r}; must be a positive int")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"unsupported num_classes={num_classes!r}; must be an int >= 2")
    client, server, aux_model = _BUILDERS[name](
        in_channels=in_channels, image_size=image_size, num_classes=num_classes, aux=aux)
    return SplitModel(client=client, server=server, aux=aux_model)


def _build_lm_split(name: str, *, num_classes: int, aux: str, lm, seq_len: int | None) -> SplitModel:
    from . import gpt2  # imported here: it needs the optional extra, the image models do not
    if aux != "default":
        raise ValueError(f"aux variant {aux!r} applies to the image models only; the GPT-2 auxiliary model is "
                         "sized by lm.aux_blocks (leave aux_model=default)")
    if num_classes != gpt2.VOCAB_SIZE:
        raise ValueError(f"unsupported num_classes={num_classes!r} for {name}: must be GPT-2's vocabulary size "
                         f"{gpt2.VOCAB_SIZE} (use a GPT-2-tokenised dataset such as e2e)")
    if lm is None:
        raise ValueError(f"{name} needs its LM settings (lm=mpisage.config.LMConfig(...))")
    client, server, aux_model = gpt2.build(name, lm, seq_len=seq_len)
    return SplitModel(client=client, server=server, aux=aux_model)


def state_bytes(module: nn.Module) -> int:
    """Bytes of all parameters and buffers (BN running stats and int64 num_batches_tracked included): what a model
    message carries."""
    return state_nbytes(module.state_dict())


def activation_shape(split: SplitModel, in_channels: int, image_size: int) -> tuple:
    """Per-sample shape of the smashed activation, from a 2-sample dummy forward in eval mode."""
    ref = next(split.client.parameters())
    flags = [(m, m.training) for m in split.client.modules()]  # restore exactly, even mixed flags
    split.client.eval()
    try:
        with torch.no_grad():
            z = split.client(torch.zeros(2, in_channels, image_size, image_size, device=ref.device, dtype=ref.dtype))
    finally:
        for m, flag in flags:
            m.training = flag
    return tuple(z.shape[1:])
