"""GPT-2 split for the language experiment: client (embeddings + first blocks), server (the other blocks + tied LM
head) and an auxiliary model (a few fresh blocks + tied head), LoRA on the query and value projections.

The transformer blocks are transformers' own `GPT2Block`, LoRA is peft's; both come with the optional extra
(`pip install -e .[llm]`) and are imported only when a GPT-2 model is built, so the image-only install stays lean.

Shapes: client int64 token ids [B, T] -> hidden [B, T, d]; server and aux hidden [B, T, d] -> logits [B, T, V].
The token sequences are right-padded and attention is causal, so a real token never attends to a padding token
that follows it: no padding mask is needed, only the causal one (and the loss ignores padding through its
labels, -100).
"""
from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mpisage.data.e2e import LLM_EXTRA_HINT, VOCAB_SIZE     # GPT-2's BPE vocabulary: one definition

GPT2_MODELS = ("gpt2_tiny", "gpt2_medium")
N_POSITIONS = 1024        # GPT-2's context length; also used for the tiny test model, so any seq_len <= 1024 fits


@dataclass(frozen=True)
class GPT2Shape:
    n_layer: int
    n_embd: int
    n_head: int


GPT2_SHAPES = {
    "gpt2_medium": GPT2Shape(n_layer=24, n_embd=1024, n_head=16),
    "gpt2_tiny": GPT2Shape(n_layer=4, n_embd=32, n_head=2),     # for CPU tests: same vocabulary and positions
}


def _require_llm_extra():
    """Imports transformers and peft, or fails with the install command."""
    try:
        import peft
        import transformers
    except ImportError as e:
        raise ImportError(f"the GPT-2 models need transformers and peft ({e}); {LLM_EXTRA_HINT}") from e
    return transformers, peft


def gpt2_config(name: str, attn_implementation: str = "sdpa", n_layer: int | None = None):
    """transformers.GPT2Config of model `name` (default dropouts 0.1, as in GPT-2's published configs)."""
    transformers, _ = _require_llm_extra()
    shape = GPT2_SHAPES[name]
    return transformers.GPT2Config(
        vocab_size=VOCAB_SIZE, n_positions=N_POSITIONS, n_embd=shape.n_embd, n_head=shape.n_head,
        n_layer=shape.n_layer if n_layer is None else n_layer, attn_implementation=attn_implementation)


# --------------------------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------------------------

class TrainableStateModule(nn.Module):
    """A module whose `state_dict()` holds only the parameters that train, and whose `load_state_dict` takes
    exactly those.

    Why: the runtime FedAvg-averages, sends and checkpoints `module.state_dict()`. The frozen GPT-2 weights
    (hundreds of MB for GPT-2 medium) never change, so every rank rebuilds them itself instead, identically:
    from `lm.pretrained`, or without a checkpoint from torch's global RNG, which the caller seeds the same way on
    every rank before `build_split`. The trainable set is fixed when the part is built (`freeze_all_but`), so a
    caller that switches `requires_grad` off for a while does not change what the state holds.
    Buffers are not part of the state: GPT-2 blocks have none that persist.
    """

    trainable_names: tuple[str, ...] = ()

    def freeze_all_but(self, trains) -> None:
        """requires_grad = trains(parameter name); records the names that train."""
        names = []
        for name, p in self.named_parameters():
            p.requires_grad_(bool(trains(name)))
            if p.requires_grad:
                names.append(name)
        self.trainable_names = tuple(names)

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        keep = {prefix + n for n in self.trainable_names}
        # Drop only this module's own frozen entries: `destination` may already hold a parent's other entries.
        for key in [k for k in state if k.startswith(prefix) and k not in keep]:
            del state[key]
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        expected = set(self.trainable_names)
        given = set(state_dict)
        missing, unexpected = sorted(expected - given), sorted(given - expected)
        if strict and (missing or unexpected):
            raise RuntimeError(
                f"{type(self).__name__}.load_state_dict takes exactly the trainable tensors "
                f"({len(expected)} of them); missing: {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                f"unexpected: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}. Frozen GPT-2 weights are "
                "never saved or sent: they are rebuilt from lm.pretrained (or the seed) on every rank; load a state "
                "saved from a part built with the same model, lm.client_blocks, lm.aux_blocks and lm.lora_rank.")
        result = super().load_state_dict({k: state_dict[k] for k in given & expected}, strict=False, assign=assign)
        # What the base class reports as missing includes every frozen tensor; report only trainable ones.
        result.missing_keys[:] = missing
        result.unexpected_keys[:] = unexpected
        return result


def _run_blocks(blocks: nn.ModuleList, hidden: torch.Tensor, config) -> torch.Tensor:
    from transformers.masking_utils import create_causal_mask
    positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    # The causal mask the way GPT2Model makes it: None under SDPA (its is_causal flag does the masking), an
    # explicit additive mask under eager attention. No padding mask: see the module docstring.
    mask = create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=None, past_key_values=None,
                              position_ids=positions)
    for block in blocks:
        hidden = block(hidden, attention_mask=mask)
    return hidden


class GPT2ClientPart(TrainableStateModule):
    """Token ids [B, T] -> hidden [B, T, d]: token + position embeddings (frozen), the first blocks (LoRA)."""

    def __init__(self, wte: nn.Embedding, wpe: nn.Embedding, drop: nn.Dropout, blocks: nn.ModuleList, config):
        super().__init__()
        self.wte, self.wpe, self.drop, self.blocks = wte, wpe, drop, blocks
        self.config = config

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.dtype != torch.long or input_ids.dim() != 2:
            raise ValueError(f"GPT-2 client expects int64 token ids [B, T], got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.wpe.num_embeddings:
            raise ValueError(f"sequence of {input_ids.shape[1]} tokens exceeds GPT-2's {self.wpe.num_embeddings} "
                             "positions; lower dataset.seq_len")
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        hidden = self.drop(self.wte(input_ids) + self.wpe(positions))
        return _run_blocks(self.blocks, hidden, self.config)


class GPT2ServerPart(TrainableStateModule):
    """Hidden [B, T, d] -> logits [B, T, V]: the remaining blocks (LoRA), final LayerNorm and the LM head tied to
    the (frozen) token embedding."""

    def __init__(self, blocks: nn.ModuleList, ln_f: nn.LayerNorm, head_weight: nn.Parameter, config):
        super().__init__()
        self.blocks, self.ln_f, self.head_weight = blocks, ln_f, head_weight
        self.config = config

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(self.ln_f(_run_blocks(self.blocks, hidden, self.config)), self.head_weight)


class GPT2AuxPart(GPT2ServerPart):
    """The client's stand-in for the server: freshly initialised blocks + final LayerNorm (all trained) and the
    LM head tied to a frozen copy of the token embedding. Its config uses eager attention: the alignment
    differentiates its input gradient again (double backward), which the fused SDPA kernels on GPUs cannot."""


# --------------------------------------------------------------------------------------------
# LoRA on query and value
# --------------------------------------------------------------------------------------------

class QKVProjection(nn.Module):
    """GPT-2's fused query/key/value projection (a Conv1D to 3d features) as three nn.Linear layers with the same
    weights, concatenated in GPT-2's order, so that LoRA can adapt the query and value projections alone
    (as in the LoRA paper's GPT-2 experiments) while the key projection stays as it is."""

    def __init__(self, fused) -> None:
        super().__init__()
        d_in, d_out3 = fused.weight.shape          # Conv1D stores [in, out] and computes x @ W + b
        d = d_out3 // 3
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d_in, d, device=fused.weight.device) for _ in range(3))
        with torch.no_grad():
            for i, linear in enumerate((self.q_proj, self.k_proj, self.v_proj)):
                linear.weight.copy_(fused.weight[:, i * d:(i + 1) * d].t())
                linear.bias.copy_(fused.bias[i * d:(i + 1) * d])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.q_proj(x), self.k_proj(x), self.v_proj(x)), dim=-1)


def add_lora(part: TrainableStateModule, lm) -> None:
    """Splits each block's fused qkv projection, injects peft LoRA into q_proj and v_proj, and freezes everything
    but the LoRA weights. LoRA A draws from torch's global RNG (Kaiming-uniform), LoRA B starts at zero, so a fresh
    adapter leaves the model's output unchanged."""
    _, peft = _require_llm_extra()
    for block in part.blocks:
        block.attn.c_attn = QKVProjection(block.attn.c_attn)
    config = peft.LoraConfig(r=int(lm.lora_rank), lora_alpha=float(lm.lora_alpha),
                             lora_dropout=float(lm.lora_dropout), target_modules=["q_proj", "v_proj"], bias="none")
    peft.inject_adapter_in_model(config, part)
    part.freeze_all_but(lambda name: ".lora_A." in name or ".lora_B." in name)


# --------------------------------------------------------------------------------------------
# Pretrained weights
# --------------------------------------------------------------------------------------------

PRETRAINED_HINT = ("lm.pretrained must be a local GPT-2 checkpoint: a Hugging Face model directory (config.json + "
                   "model.safetensors, e.g. written by GPT2LMHeadModel.save_pretrained) or a .safetensors / "
                   "PyTorch .bin state-dict file; or set lm.pretrained=null to start from random weights")
# Entries of GPT-2 checkpoints that are not weights of GPT2Model: the tied LM head and old causal-mask buffers.
_NOT_GPT2MODEL_WEIGHTS = re.compile(r"^(lm_head\.weight|.*\.attn\.(bias|masked_bias))$")


def load_pretrained_gpt2_state(path: str) -> dict[str, torch.Tensor]:
    """GPT2Model state (keys 'wte.weight', 'h.<j>.…', 'ln_f.…'; float32) from a local checkpoint.

    No pickle: directories go through transformers' loader (safetensors, or torch.load with weights_only), files
    through safetensors or torch.load(weights_only=True)."""
    transformers, _ = _require_llm_extra()
    path = os.path.expanduser(str(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"lm.pretrained={path!r} does not exist. {PRETRAINED_HINT}.")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"lm.pretrained={path!r} is a directory without config.json. {PRETRAINED_HINT}.")
        try:
            model = transformers.GPT2LMHeadModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load the GPT-2 checkpoint in {path!r}: {e}. {PRETRAINED_HINT}.") from e
        state = model.transformer.state_dict()
    elif path.endswith(".safetensors"):
        from safetensors.torch import load_file
        state = load_file(path, device="cpu")
    elif path.endswith((".bin", ".pt", ".pth")):
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"lm.pretrained={path!r}: unknown checkpoint format. {PRETRAINED_HINT}.")
    out = {}
    for key, tensor in state.items():
        key = key.removeprefix("transformer.")
        if not _NOT_GPT2MODEL_WEIGHTS.match(key):
            out[key] = tensor.float() if tensor.is_floating_point() else tensor
    return out


def _check_pretrained_shape(state: dict[str, torch.Tensor], name: str, path: str) -> None:
    shape = GPT2_SHAPES[name]
    wte = state.get("wte.weight")
    n_blocks = len({int(m.group(1)) for k in state if (m := re.match(r"h\.(\d+)\.", k))})
    if wte is None or tuple(wte.shape) != (VOCAB_SIZE, shape.n_embd) or n_blocks != shape.n_layer:
        found = "no wte.weight" if wte is None else f"wte {tuple(wte.shape)}"
        raise ValueError(f"lm.pretrained={path!r} is not a {name} checkpoint: found {found} and {n_blocks} blocks, "
                         f"{name} has wte ({VOCAB_SIZE}, {shape.n_embd}) and {shape.n_layer} blocks. Give a "
                         f"checkpoint of that size, or pick the model that matches it.")


def _gpt2_body(name: str, lm):
    """A transformers GPT2Model of size `name`: pretrained weights when lm.pretrained is set, else random init
    from torch's global RNG (GPT-2's scheme: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer))."""
    transformers, _ = _require_llm_extra()
    config = gpt2_config(name)
    if not lm.pretrained:
        return transformers.GPT2Model(config)
    state = load_pretrained_gpt2_state(lm.pretrained)
    _check_pretrained_shape(state, name, lm.pretrained)
    # Built on the meta device: no random init to overwrite, and assign=True adopts the loaded tensors.
    with torch.device("meta"):
        body = transformers.GPT2Model(config)
    try:
        body.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"lm.pretrained={lm.pretrained!r} does not match GPT-2's layout: {e}") from e
    return body


# --------------------------------------------------------------------------------------------
# Builder
# --------------------------------------------------------------------------------------------

def build(name: str, lm, seq_len: int | None = None) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(client, server, aux) for `name` in GPT2_MODELS with the settings in `lm` (fields of mpisage.config.LMConfig).

    client: blocks 0..lm.client_blocks-1, server: blocks lm.client_blocks..n_layer-1, in the checkpoint's order.
    Every random draw (random body, LoRA A, aux init) comes from torch's global RNG in a fixed order, so equal
    seeds give equal parts on every rank.
    """
    transformers, _ = _require_llm_extra()
    if name not in GPT2_SHAPES:
        raise ValueError(f"unknown GPT-2 model {name!r}; allowed: {GPT2_MODELS}")
    n_layer = GPT2_SHAPES[name].n_layer
    if not 1 <= int(lm.client_blocks) < n_layer:
        raise ValueError(f"lm.client_blocks={lm.client_blocks!r} is not allowed for {name}: must be in "
                         f"1..{n_layer - 1} (the server needs at least one of its {n_layer} blocks)")
    if int(lm.aux_blocks) < 1 or int(lm.lora_rank) < 1:
        raise ValueError(f"lm.aux_blocks={lm.aux_blocks!r} and lm.lora_rank={lm.lora_rank!r} must be >= 1")
    if seq_len is not None and not 1 <= int(seq_len) <= N_POSITIONS:
        raise ValueError(f"dataset.seq_len={seq_len!r} is not allowed for {name}: must be in 1..{N_POSITIONS} "
                         "(GPT-2's positions)")

    body = _gpt2_body(name, lm)
    for p in body.parameters():
        p.requires_grad_(False)
    cut = int(lm.client_blocks)
    blocks = list(body.h)
    client = GPT2ClientPart(body.wte, body.wpe, body.drop, nn.ModuleList(blocks[:cut]), body.config)
    # Separate frozen Parameters over the same storage: one copy in memory while the parts share a device, and
    # moving one part (.to(device)) leaves the others where they are.
    server = GPT2ServerPart(nn.ModuleList(blocks[cut:]), body.ln_f,
                            nn.Parameter(body.wte.weight.detach(), requires_grad=False), body.config)
    add_lora(client, lm)
    add_lora(server, lm)

    aux_config = gpt2_config(name, attn_implementation="eager", n_layer=int(lm.aux_blocks))
    # A GPT2Model of the aux's depth gives fresh blocks and LayerNorm with GPT-2's own initialisation. It is built
    # with one-token embeddings (then dropped) so that no second vocabulary-sized table is drawn.
    init_config = copy.deepcopy(aux_config)
    init_config.vocab_size, init_config.n_positions = 1, 1
    fresh = transformers.GPT2Model(init_config)
    aux = GPT2AuxPart(fresh.h, fresh.ln_f, nn.Parameter(body.wte.weight.detach(), requires_grad=False), aux_config)
    aux.freeze_all_but(lambda pname: pname != "head_weight")
    return client, server, aux
