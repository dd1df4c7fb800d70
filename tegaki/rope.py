"""Rotary position embeddings (RoPE) and the ways to stretch them to longer contexts.

RoPE turns each pair of query/key channels into a 2-D vector and rotates it by an angle
`position * inv_freq[i]`. The dot product q·k then depends only on the *distance* between the two
positions. We use the half-split pairing of transformers (channel i pairs with channel i + d/2),
not the interleaved pairs of the original paper: the checkpoints we load expect it.

Scaling (to run past the pre-training context) only changes `inv_freq`, plus, for YaRN, a factor
on cos and sin:
    linear  every frequency divided by the factor (position interpolation)
    ntk     the base raised: theta' = theta * s^(d / (d - 2))   (NTK-aware, static)
    yarn    high frequencies kept, low frequencies interpolated, a linear ramp in between
    llama3  the same idea with wavelength thresholds and a smooth blend
"""

from __future__ import annotations

import math

import torch

from tegaki.config import ModelConfig


def rope_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Return (inv_freq of shape (head_dim // 2,), attention_factor) for the config's scaling."""
    d = config.head_dim
    base = config.rope_theta
    s = config.rope_factor
    kind = config.rope_scaling

    if kind == "ntk":
        base = base * s ** (d / (d - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))  # (d/2,)

    if kind in ("none", "ntk"):
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / s, 1.0
    if kind == "yarn":
        return _yarn(config, inv_freq)
    if kind == "llama3":
        return _llama3(config, inv_freq), 1.0
    raise ValueError(f"unknown rope_scaling {kind!r}")


def _yarn(config: ModelConfig, inv_freq: torch.Tensor) -> tuple[torch.Tensor, float]:
    d, base, s = config.head_dim, config.rope_theta, config.rope_factor
    original = config.rope_original_max_len

    def dim_for_rotations(rotations: float) -> float:
        # The channel index whose wavelength fits `rotations` times into the original context.
        return d * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = dim_for_rotations(config.rope_beta_fast)
    high = dim_for_rotations(config.rope_beta_slow)
    if config.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero in the ramp

    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    # ramp = 0: fast-rotating channels, kept as they were (extrapolate);
    # ramp = 1: slow channels, interpolated (divided by s).
    inv_freq = inv_freq * (1 - ramp) + (inv_freq / s) * ramp

    factor = config.rope_attention_factor
    if factor is None:
        factor = 0.1 * math.log(s) + 1.0 if s > 1 else 1.0
    return inv_freq, factor


def _llama3(config: ModelConfig, inv_freq: torch.Tensor) -> torch.Tensor:
    s = config.rope_factor
    original = config.rope_original_max_len
    low_freq_wavelen = original / config.rope_low_freq_factor
    high_freq_wavelen = original / config.rope_high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (low frequencies) are interpolated, short ones kept ...
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s, inv_freq)
    # ... and the band in between blends the two smoothly.
    smooth = (original / wavelen - config.rope_low_freq_factor) / (
        config.rope_high_freq_factor - config.rope_low_freq_factor
    )
    blended = (1 - smooth) * scaled / s + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


def rope_cos_sin(
    inv_freq: torch.Tensor, attention_factor: float, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for each position: positions (B, T) -> two tensors (B, 1, T, head_dim)."""
    angles = positions[..., None].float() * inv_freq  # (B, T, d/2)
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, d): both halves of a pair share an angle
    cos = (angles.cos() * attention_factor).to(dtype)
    sin = (angles.sin() * attention_factor).to(dtype)
    return cos[:, None], sin[:, None]  # a head axis to broadcast over


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x[i], x[i + d/2]) pair: x (B, H, T, d) -> (B, H, T, d)."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, H, T, d/2) each
    rotated_half = torch.cat([-x2, x1], dim=-1)  # the pair (a, b) turned 90 degrees: (-b, a)
    return x * cos + rotated_half * sin
