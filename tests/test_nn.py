"""Shapes, gradients, batch independence and argument checks of the shared network blocks."""

from __future__ import annotations

import pytest
import torch

from pyro_dlatent.nn import (
    ConvDecoder,
    ConvEncoder,
    check_image_size,
    level_channels,
    make_activation,
    make_norm,
)


@pytest.mark.parametrize("size", [16, 32, 64])
@pytest.mark.parametrize(("norm", "activation"), [("group", "silu"), ("none", "gelu")])
def test_encoder_and_decoder_shapes(size, norm, activation):
    encoder = ConvEncoder(size, 10, width=4, hidden=16, norm=norm, activation=activation)
    decoder = ConvDecoder(5, size, width=4, hidden=16, norm=norm, activation=activation)
    features = encoder(torch.randn(3, size, size))
    assert features.shape == (3, 10)
    assert decoder(torch.randn(3, 5)).shape == (3, size, size)


@pytest.mark.parametrize("depth", [1, 2])
def test_gradients_reach_every_parameter(depth):
    encoder = ConvEncoder(32, 6, width=4, hidden=16, depth=depth)
    decoder = ConvDecoder(6, 32, width=4, hidden=16, depth=depth)
    images = torch.randn(4, 32, 32)
    loss = (decoder(encoder(images)) - images).pow(2).mean()
    loss.backward()
    for name, param in [*encoder.named_parameters(), *decoder.named_parameters()]:
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


def test_depth_adds_convolutions():
    shallow = ConvEncoder(32, 6, width=4, depth=1)
    deep = ConvEncoder(32, 6, width=4, depth=2)

    def convolutions(module):
        return sum(isinstance(x, torch.nn.Conv2d) for x in module.modules())

    assert convolutions(shallow) == 3
    assert convolutions(deep) == 6


def test_encoding_does_not_depend_on_the_rest_of_the_batch():
    encoder = ConvEncoder(16, 4, width=8, hidden=16, norm="group").eval()
    images = torch.randn(5, 16, 16)
    together = encoder(images)
    alone = torch.cat([encoder(images[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def test_harmonics_append_fourier_features_of_the_leading_inputs():
    decoder = ConvDecoder(5, 16, width=4, hidden=16, harmonics=3, harmonic_inputs=2)
    latent = torch.randn(7, 5)
    features = decoder.features_of(latent)
    assert features.shape == (7, 5 + 2 * 3 * 2)
    torch.testing.assert_close(features[:, :5], latent)
    # Order: sin(f z_j) for j < 2 and f = 1, 2, 3 (frequency fastest), then the cosines.
    phase = torch.stack([f * latent[:, j] for j in range(2) for f in (1, 2, 3)], dim=-1)
    torch.testing.assert_close(features[:, 5:11], torch.sin(phase))
    torch.testing.assert_close(features[:, 11:], torch.cos(phase))
    assert decoder.head[0].in_features == 17
    assert decoder(latent).shape == (7, 16, 16)
    # No parameters and nothing extra in the state dict: the features are a fixed map.
    plain = ConvDecoder(5, 16, width=4, hidden=16)
    assert plain.features_of(latent) is latent
    assert set(decoder.state_dict()) == set(plain.state_dict())
    latent.requires_grad_(True)
    decoder(latent).sum().backward()
    assert torch.isfinite(latent.grad).all() and latent.grad.abs().sum() > 0


def test_channel_schedule_caps_at_four_times_width():
    assert level_channels(16, 5) == [16, 32, 64, 64, 64]
    assert isinstance(make_norm("group", 12), torch.nn.GroupNorm)
    assert make_norm("group", 12).num_groups == 4
    assert isinstance(make_activation("gelu"), torch.nn.GELU)


@pytest.mark.parametrize("size", [8, 24, 48, 32.0, True, "32"])
def test_bad_image_size_raises(size):
    with pytest.raises(ValueError, match="image_size"):
        check_image_size(size)
    with pytest.raises(ValueError, match="image_size"):
        ConvEncoder(size, 4)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: ConvEncoder(16, 0), "out_features"),
        (lambda: ConvEncoder(16, 4, width=0), "width"),
        (lambda: ConvDecoder(0, 16), "in_features"),
        (lambda: ConvDecoder(4, 16, depth=0), "depth"),
        (lambda: ConvDecoder(4, 16, norm="batch"), "norm"),
        (lambda: ConvEncoder(16, 4, activation="relu"), "activation"),
        (lambda: ConvDecoder(4, 16, harmonics=-1), "harmonics"),
        (lambda: ConvDecoder(4, 16, harmonics=2, harmonic_inputs=5), "harmonic_inputs"),
    ],
)
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()
