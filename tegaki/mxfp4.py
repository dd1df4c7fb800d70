"""MXFP4: how GPT-OSS checkpoints on the hub store their experts, and the way back to floats.

The expert matrices (over 90% of GPT-OSS's weights) ship as 4-bit floats in the OCP "microscaling"
format: each run of 32 weights along a row shares one power-of-two scale. config.json says
{"quantization_config": {"quant_method": "mxfp4"}}, and each expert tensor X is stored as
  X_blocks  (E, R, G, 16) uint8  two 4-bit codes per byte, the low nibble first; 32 codes per group
  X_scales  (E, R, G)     uint8  the group's exponent, biased by 127: scale = 2 ** (s - 127)
with R the rows of the (out, in) matrix and G * 32 = in. A 4-bit code is an E2M1 float: a sign
bit, 2 exponent bits, 1 mantissa bit -- exactly the 16 values below.
"""

from __future__ import annotations

import torch

from tegaki.errors import TegakiError

FP4_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """blocks (E, R, G, 16) uint8 + scales (E, R, G) uint8 -> weights (E, G*32, R) in tegaki's
    (in, out) layout, one expert at a time so the float copy of a 20B model never sits in memory twice."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise TegakiError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    table = torch.tensor(FP4_E2M1_VALUES, dtype=torch.float32)
    experts = []
    for e in range(blocks.shape[0]):
        codes = blocks[e].to(torch.uint8)  # (R, G, 16)
        low, high = table[(codes & 0x0F).long()], table[(codes >> 4).long()]  # (R, G, 16) each
        values = torch.stack([low, high], dim=-1).flatten(-2)  # (R, G, 32): low nibble is the earlier weight
        exponent = scales[e].to(torch.int32)[..., None] - 127  # (R, G, 1)
        # Exact: 4-bit values times powers of two fit bfloat16 without rounding.
        weights = torch.ldexp(values, exponent).flatten(-2)  # (R, G*32) = (out, in)
        experts.append(weights.t().to(dtype))  # (in, out)
    return torch.stack(experts).contiguous()  # (E, in, out)


def quantize_mxfp4(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `dequantize_mxfp4` (round to nearest): weights (E, in, out) -> blocks, scales.
    tegaki only reads MXFP4; this exists to write test checkpoints in the hub's format."""
    E, n_in, n_out = weights.shape
    if n_in % 32:
        raise TegakiError(f"MXFP4 needs the input width to be a multiple of 32, got {n_in}")
    rows = weights.float().transpose(1, 2).reshape(E, n_out, n_in // 32, 32)  # (E, R, G, 32)
    # The smallest power of two that brings the group's largest magnitude within the grid's 6.0.
    peak = rows.abs().amax(dim=-1).clamp(min=2.0**-126)  # (E, R, G)
    exponent = torch.ceil(torch.log2(peak / 6.0)).clamp(-127, 127)
    scaled = rows / torch.exp2(exponent)[..., None]  # within [-6, 6]
    table = torch.tensor(FP4_E2M1_VALUES)
    codes = (scaled[..., None] - table).abs().argmin(dim=-1).to(torch.uint8)  # (E, R, G, 32)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)  # (E, R, G, 16)
    return blocks, (exponent + 127).to(torch.uint8)


def dequantize_experts(hf_state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Replace each X_blocks / X_scales pair by the float tensor X the name tables expect."""
    out = {k: v for k, v in hf_state.items() if not k.endswith(("_blocks", "_scales"))}
    for key in hf_state:
        if key.endswith("_blocks"):
            name = key[: -len("_blocks")]
            if name + "_scales" not in hf_state:
                raise TegakiError(f"MXFP4 checkpoint: {key} has no matching {name}_scales")
            out[name] = dequantize_mxfp4(hf_state[key], hf_state[name + "_scales"], dtype)
    return out
