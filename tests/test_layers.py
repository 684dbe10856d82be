"""gemma/model/layers.py against transformers, module by module: Gemma 4's RMSNorm (the weight itself, or none) and
its proportional RoPE frequencies. (Gemma 1-3's modules are checked through whole models in tests/test_model.py.)"""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma4TextConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm

from gemma.model.layers import RMSNorm, rope_inv_freq


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_weight", [True, False])
def test_gemma4_rms_norm_is_bit_exact(dtype, with_weight):
    torch.manual_seed(0)
    ours, theirs = RMSNorm(24, 1e-6, offset=0.0, weight=with_weight), Gemma4RMSNorm(24, 1e-6, with_scale=with_weight)
    if with_weight:
        assert torch.equal(ours.weight, theirs.weight)  # both start at ones (x / rms(x))
        w = 1 + 0.5 * torch.randn(24)  # randomised: a missing multiply, or a 1 + w, would show
        ours.weight.data.copy_(w)
        theirs.weight.data.copy_(w)
    else:
        assert ours.weight is None and not list(theirs.parameters())
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    x = (3 * torch.randn(2, 7, 24)).to(dtype)
    assert torch.equal(ours(x), theirs(x))


def test_gemma1_to_3_rms_norm_keeps_its_zero_centred_weight():
    norm = RMSNorm(8)
    assert norm.offset == 1.0 and torch.equal(norm.weight, torch.zeros(8))
    x = torch.randn(3, 8)
    norm.weight.data.copy_(torch.randn(8))
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + norm.weight)
    torch.testing.assert_close(norm(x), expected, rtol=1e-6, atol=1e-6)  # five ops against one: rounding only


@pytest.mark.parametrize(
    "head_dim, fraction, theta, factor",
    [(24, 0.25, 1e6, 1.0), (512, 0.25, 1e6, 1.0), (24, 0.5, 1e4, 2.0), (24, 1.0, 1e6, 1.0)],
)
def test_proportional_rope_frequencies_equal_transformers(head_dim, fraction, theta, factor):
    """The denominator of each exponent is the whole head_dim, not the rotated width (a known porting bug)."""
    rope = {"rope_type": "proportional", "partial_rotary_factor": fraction, "rope_theta": theta}
    if factor != 1.0:
        rope["factor"] = factor
    cfg = Gemma4TextConfig(
        vocab_size=96,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        head_dim=12,
        global_head_dim=head_dim,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4}, "full_attention": rope},
    )
    theirs, _ = ROPE_INIT_FUNCTIONS["proportional"](cfg, None, layer_type="full_attention")
    ours = rope_inv_freq(head_dim, theta, factor, rotated=fraction)
    assert ours.shape == (head_dim // 2,) and torch.equal(ours, theirs)


def test_the_notes_worked_example_of_proportional_rope():
    # ../shared/GEMMA4_NOTES.md 2.6: head_dim 24, p = 0.25 -> three turning frequencies (exponents 0, 2/24, 4/24).
    expected = torch.tensor([1.0, 1e6 ** (-2 / 24), 1e6 ** (-4 / 24)] + [0.0] * 9)
    torch.testing.assert_close(rope_inv_freq(24, 1e6, rotated=0.25), expected, rtol=1e-6, atol=0)
