"""The analytic FLOP count agrees with torch.utils.flop_counter on a real forward pass."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vit import VisionTransformer, decode_variant, forward_flops, gflops, train_flops


@pytest.mark.parametrize(
    "config",
    [
        decode_variant("Ti/4", image_size=32, num_classes=10),
        decode_variant("Ti/4", image_size=64, num_classes=10),
        decode_variant("S/16", image_size=(224, 320), num_classes=17),
        decode_variant("B/16", image_size=384, num_classes=1000),
        decode_variant("L/16", image_size=224, num_classes=21843),
        decode_variant("H/14", image_size=224, num_classes=1000),
    ],
    ids=lambda c: f"{c.variant}@{c.image_size}",
)
def test_forward_flops_match_the_flop_counter(config):
    # Meta tensors: shapes only, so even H/14 costs nothing. The math SDPA backend is made of matmuls
    # the counter sees; fused CPU kernels are not counted by torch's flop counter.
    with torch.device("meta"):
        model = VisionTransformer(config)
        images = torch.empty(1, 3, *config.image_size)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(images)
    assert forward_flops(config) == counter.get_total_flops()


def test_backward_counts_twice_the_forward():
    config = decode_variant("Ti/4", image_size=32, num_classes=10, depth=2)
    model = VisionTransformer(config)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 32, 32)).sum().backward()
    # the backward needs no gradient for the input images, so the patch embedding's backward is half.
    assert abs(counter.get_total_flops() - train_flops(config)) / train_flops(config) < 0.02


def test_published_scale():
    """ViT-B/16 at 224 px is ~17.6 GFLOPs (timm's published figure counts MACs: 17.6 GMACs = 35 GFLOPs)."""
    assert gflops(decode_variant("B/16", image_size=224)) == pytest.approx(2 * 17.56, rel=0.01)
    assert gflops(decode_variant("B/16", image_size=384)) > 3 * gflops(decode_variant("B/16", image_size=224))
