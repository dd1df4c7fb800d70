"""Sampling: the last position's logits -> the next token.

In this order (as transformers does): repetition / presence penalties -> temperature -> top-k ->
top-p -> min-p -> draw. `temperature=0` means greedy (argmax). The knobs travel together as one
`SamplingSettings`, which checks them when it is made: the server, `generate`, `chat` and `eval` all
build one, so a setting that would turn the logits into inf or NaN is refused in this one place.

Why the ranges are what they are: the logits are float32, and a Python float meets them as a
float32. A temperature of 1e-300 is 0 there (the logits divided by it are inf), a repetition
penalty of 1e-308 likewise, a presence penalty of 1e300 inf (a seen token's logit -inf, and every
token seen: all -inf, NaN after softmax). Within the ranges below every step stays finite for any
finite logits a model gives.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields

import torch

from tegaki.errors import TegakiError

# -------------------------------------------------------------------------------------------------
# Samplers: each takes logits (B, V) and returns logits (B, V) with some entries set to -inf
# -------------------------------------------------------------------------------------------------


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty on tokens already in the text: positive logits divided, negative multiplied
    (so the token always becomes less likely). seen (B, V) bool."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_presence_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """OpenAI's presence penalty: subtract a constant from every token already in the text."""
    if penalty == 0.0:
        return logits
    return logits - penalty * seen.to(logits.dtype)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties at the k-th value are kept too)."""
    if k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling: keep the most likely tokens until their probability adds up to p.

    A token is kept when the probability of the tokens strictly more likely than it is below p;
    so the most likely token is always kept, and the set is the smallest that reaches p.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of everything ranked above
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False  # the best token stays even when p is below float32's smallest number
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least min_p times the most likely token's."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)  # (B, 1)
    return logits.masked_fill(probs < threshold, float("-inf"))


# The ranges SamplingSettings allows (see the module's docstring for why they keep float32 finite).
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0  # and 0, greedy
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0
MAX_PRESENCE_PENALTY = 100.0  # either sign


class SamplingSettingError(TegakiError):
    """A sampling setting out of its range; `name` is the setting (the server's error names it)."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


@dataclass(frozen=True)
class SamplingSettings:
    """How the next token is drawn. Every field's default leaves that step out. Made only with
    settings the sampler can use: anything else raises `SamplingSettingError` (a TegakiError)."""

    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # keep the smallest set whose probability reaches p
    min_p: float | None = None  # drop tokens below min_p x the top token's probability
    repetition_penalty: float = 1.0  # > 1 makes tokens already seen less likely (1 = off)
    presence_penalty: float = 0.0  # subtracted from the logits of tokens already seen (0 = off)

    def __post_init__(self):
        self.check()

    @classmethod
    def from_keywords(cls, **keywords) -> SamplingSettings:
        """SamplingSettings(temperature=..., ...) that names a mistyped keyword and the known ones."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(keywords) - set(known))
        if unknown:
            raise TegakiError(f"unknown sampling setting(s): {', '.join(unknown)}. Known: {', '.join(known)}")
        return cls(**keywords)

    def check(self) -> None:
        """Bad settings are a person's mistake: say which and what is allowed."""
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.default is None:  # a step left out
                continue
            kind = numbers.Integral if f.name == "top_k" else numbers.Real
            if isinstance(value, bool) or not isinstance(value, kind):
                wanted = "an integer" if kind is numbers.Integral else "a number"
                raise SamplingSettingError(f.name, f"{f.name} must be {wanted}, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):  # NaN passes every comparison below
                raise SamplingSettingError(f.name, f"{f.name} must be a finite number, got {value}")
        t = self.temperature
        if t != 0 and not MIN_TEMPERATURE <= t <= MAX_TEMPERATURE:
            raise SamplingSettingError(
                "temperature",
                f"temperature must be 0 (greedy) or between {MIN_TEMPERATURE} and {MAX_TEMPERATURE}, got {t}",
            )
        if self.top_k is not None and self.top_k < 1:
            raise SamplingSettingError("top_k", f"top_k must be >= 1 (or None for no limit), got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise SamplingSettingError("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise SamplingSettingError("min_p", f"min_p must be in [0, 1], got {self.min_p}")
        r = self.repetition_penalty
        if not MIN_REPETITION_PENALTY <= r <= MAX_REPETITION_PENALTY:
            raise SamplingSettingError(
                "repetition_penalty",
                f"repetition_penalty must be between {MIN_REPETITION_PENALTY} and {MAX_REPETITION_PENALTY} "
                f"(1 = off, above 1 discourages repeats), got {r}",
            )
        if abs(self.presence_penalty) > MAX_PRESENCE_PENALTY:
            raise SamplingSettingError(
                "presence_penalty",
                f"presence_penalty must be between {-MAX_PRESENCE_PENALTY} and {MAX_PRESENCE_PENALTY} (0 = off), "
                f"got {self.presence_penalty}",
            )

    @property
    def uses_seen(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0


def sample_next(
    logits: torch.Tensor,
    settings: SamplingSettings,
    *,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, V) of the last position -> next tokens (B,)."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, settings.repetition_penalty)
        logits = apply_presence_penalty(logits, seen, settings.presence_penalty)
    if settings.temperature == 0:
        return logits.argmax(dim=-1)  # greedy: the filters below cannot change the argmax
    probs = shaped_logits(logits, settings).softmax(dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)  # (B,)


def shaped_logits(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p: logits (B, V) as sampling sees them (temperature > 0)."""
    logits = logits / settings.temperature
    if settings.top_k is not None:
        logits = top_k_filter(logits, settings.top_k)
    if settings.top_p is not None:
        logits = top_p_filter(logits, settings.top_p)
    if settings.min_p is not None:
        logits = min_p_filter(logits, settings.min_p)
    return logits


def sampling_distribution(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """logits (V,) -> the probabilities `sample_next` draws from under these settings (no
    penalties), (V,); greedy puts everything on the argmax. What the page's bars show."""
    logits = logits.float()[None]  # (1, V)
    if settings.temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()[0]
    return shaped_logits(logits, settings).softmax(dim=-1)[0]
