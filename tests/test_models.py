"""Tests for mpisage.models: sizes, shapes, double backward, seeding and validation (serial, CPU, small)."""
import pytest
import torch
import torch.nn.functional as F

from mpisage.models import AUX_VARIANTS, IMAGE_MODELS, activation_shape, build_split, state_bytes

# (in_channels, image_size) used for each model in the generic tests.
INPUTS = {"cnn": (1, 28), "resnet18": (3, 32), "resnet16": (3, 32), "alexnet": (3, 32)}


def _build(name, aux="default", num_classes=10, seed=0):
    torch.manual_seed(seed)
    c, s = INPUTS[name]
    return build_split(name, in_channels=c, image_size=s, num_classes=num_classes, aux=aux)


def _batch(name, b=4):
    c, s = INPUTS[name]
    return torch.randn(b, c, s, s)


def test_resnet18_exact_state_bytes():
    split = build_split("resnet18", in_channels=3, image_size=32, num_classes=10)
    assert state_bytes(split.client) == 2_740_048
    assert state_bytes(split.server) == 42_025_080
    assert state_bytes(split.aux) == 8_419_408


def test_resnet18_full_aux_matches_server_size():
    split = build_split("resnet18", in_channels=3, image_size=32, num_classes=10, aux="full")
    assert state_bytes(split.aux) == state_bytes(split.server)


@pytest.mark.parametrize("name,c,s,expected", [
    ("cnn", 1, 28, (16, 14, 14)),
    ("cnn", 3, 32, (16, 16, 16)),
    ("resnet18", 3, 32, (128, 4, 4)),
])
def test_activation_shape(name, c, s, expected):
    split = build_split(name, in_channels=c, image_size=s, num_classes=10)
    split.client.train()
    assert activation_shape(split, c, s) == expected
    assert split.client.training  # training flag restored
    split.client.eval()
    activation_shape(split, c, s)
    assert not split.client.training


@pytest.mark.parametrize("name", IMAGE_MODELS)
@pytest.mark.parametrize("aux", AUX_VARIANTS)
def test_forward_shapes_and_whole(name, aux):
    split = _build(name, aux, num_classes=7)
    x = _batch(name)
    for training in (True, False):
        for m in (split.client, split.server, split.aux):
            m.train(training)
        z = split.client(x)
        assert split.server(z).shape == (4, 7)
        assert split.aux(z).shape == (4, 7)
    # eval mode: deterministic, so whole() must reproduce server(client(x)) exactly
    whole = split.whole()
    assert whole[0] is split.client and whole[1] is split.server
    torch.testing.assert_close(whole(x), split.server(split.client(x)), rtol=0, atol=0)


@pytest.mark.parametrize("name", IMAGE_MODELS)
@pytest.mark.parametrize("aux", AUX_VARIANTS)
def test_aux_double_backward(name, aux):
    split = _build(name, aux)
    split.aux.train()
    with torch.no_grad():
        z0 = split.client(_batch(name))
    z = z0.clone().requires_grad_(True)
    y = torch.randint(0, 10, (4,))
    g = torch.autograd.grad(F.cross_entropy(split.aux(z), y), z, create_graph=True)[0]
    target = torch.randn_like(g) * 1e-3
    ((g - target) ** 2).sum().backward()
    params = list(split.aux.parameters())
    assert params
    for p in params:
        assert p.grad is not None
        assert torch.isfinite(p.grad).all()
    assert any(p.grad.abs().sum() > 0 for p in params)


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_server_backward_to_leaf_input(name):
    split = _build(name)
    with torch.no_grad():
        z = split.client(_batch(name))
    z.requires_grad_(True)
    F.cross_entropy(split.server(z), torch.randint(0, 10, (4,))).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_same_seed_same_weights_different_seed_differs(name):
    a, b, c = _build(name, seed=0), _build(name, seed=0), _build(name, seed=1)
    for part in ("client", "server", "aux"):
        sa, sb, sc = (getattr(m, part).state_dict() for m in (a, b, c))
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert not all(torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("kwargs,bad", [
    (dict(name="vgg"), "'vgg'"),
    (dict(aux="huge"), "'huge'"),
    (dict(name="cnn", image_size=30), "image_size=30"),
    (dict(name="resnet18", image_size=16), "image_size=16"),
    (dict(in_channels=0), "in_channels=0"),
])
def test_bad_arguments_raise_value_error(kwargs, bad):
    args = dict(name="cnn", in_channels=1, image_size=28, num_classes=10, aux="default")
    args.update(kwargs)
    name = args.pop("name")
    with pytest.raises(ValueError, match=bad):
        build_split(name, **args)


def test_resnet18_other_image_sizes():
    for c, s in ((1, 28), (3, 64)):
        split = build_split("resnet18", in_channels=c, image_size=s, num_classes=10)
        split.client.eval(); split.server.eval()
        assert split.server(split.client(torch.randn(2, c, s, s))).shape == (2, 10)
