"""Positions at non-square sizes (aspect-ratio buckets): the model equals the naive joint attention of
``naive_reference`` on wide and tall patch grids, for every image position scheme, and the sin-cos table is the
reference's, centre-cropped on each axis."""

import copy

import pytest
import torch
import torch.nn.functional as F

from fusedit.models.config import LLMGeometry, ModelConfig
from fusedit.models.dit import build_model

from .test_deep_fusion_naive import DECODERS, encode, inputs, naive_forward, randomize, sincos_table


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.mark.parametrize("pos_embed", ["ape", "1d-rope", "2d-rope", "m-rope"])
@pytest.mark.parametrize("height, width", [(8, 16), (12, 4)])
def test_non_square_grids_match_the_naive_reference(pos_embed, height, width):
    decoder = copy.deepcopy(DECODERS["llama"])
    config = ModelConfig(
        fusion="deep",
        pos_embed=pos_embed,
        timestep_conditioning="adaln-zero",
        in_channels=3,
        sample_size=8,
        patch_size=2,
        dit_hidden_size=24,
        dit_intermediate_size=40,
    )
    model = build_model(config, LLMGeometry.from_hf_config(decoder.config)).eval()
    randomize(model, 21)
    _, t, ids, mask = inputs(22, "left")
    x = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(23))
    ours = model(x, t, encode(decoder, model, ids, mask))
    assert ours.shape == x.shape
    torch.testing.assert_close(ours, naive_forward(model, decoder, "llama", x, t, ids, mask), atol=2e-5, rtol=1e-4)
    if pos_embed == "ape":  # the table itself, written out: rows and columns cropped separately
        conv = F.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=2)
        expected = conv.flatten(2).transpose(1, 2) + sincos_table(config, height // 2, width // 2, 24)
        torch.testing.assert_close(model.patch_embed(x), expected, atol=1e-5, rtol=1e-5)


def test_a_grid_longer_than_the_table_is_refused():
    decoder = DECODERS["llama"]
    config = ModelConfig(pos_embed="ape", in_channels=3, sample_size=8, patch_size=2, pos_embed_max_size=6)
    model = build_model(config, LLMGeometry.from_hf_config(decoder.config)).eval()
    with pytest.raises(ValueError):
        model.patch_embed(torch.zeros(1, 3, 8, 14))  # 7 patches wide > 6
