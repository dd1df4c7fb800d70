"""Multiple-choice tasks: pick the ending the model finds most likely, as HellaSwag and ARC are scored.

A task file has one JSON object per line: {"context": "...", "endings": ["...", ...], "label": 0}.
Each ending is scored by the mean log-probability of its tokens after the context ("length-normalised":
a long ending is not punished for having more tokens to get wrong -- nanoGPT's and llm.c's HellaSwag
evaluation, lm-eval's acc_norm in tokens). Accuracy comes with a 95% Wilson interval: with 100 items,
a 60% score is only known to within about +-10 points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from tegaki.errors import TegakiError
from tegaki.eval.text import token_logprobs
from tegaki.finetune.data import read_json_lines


@dataclass
class Choice:
    line: int
    context: str
    endings: list[str]
    label: int


def read_tasks(path: str | Path) -> list[Choice]:
    """The items of a task file; a bad line is a TegakiError naming it."""
    items = []
    for number, where, obj in read_json_lines(path):
        endings = obj.get("endings") if isinstance(obj, dict) else None
        if not (
            isinstance(obj, dict)
            and isinstance(obj.get("context"), str)
            and isinstance(endings, list)
            and len(endings) >= 2
            and all(isinstance(e, str) and e for e in endings)
        ):
            raise TegakiError(f'{where}: expected {{"context": text, "endings": [two or more texts], "label": n}}')
        label = obj.get("label")
        if not (type(label) is int and 0 <= label < len(endings)):  # true is not 1
            raise TegakiError(f"{where}: label must be an index into endings (0..{len(endings) - 1}), got {label!r}")
        items.append(Choice(number, obj["context"], endings, label))
    if not items:
        raise TegakiError(f"{path} holds no tasks")
    return items


def ending_logprobs(model, tokenizer, context: str, ending: str) -> torch.Tensor:
    """log p of each token of `ending` after `context`: (tokens of ending,)."""
    start = [tokenizer.eot_id] if tokenizer.eot_id is not None else []
    context_ids = start + tokenizer.encode_ordinary(context)
    ending_ids = tokenizer.encode_ordinary(ending)
    if not ending_ids:
        raise TegakiError(f"the ending {ending!r} has no tokens")
    if not context_ids:  # no end-of-text token and no context: the first token cannot be scored
        context_ids, ending_ids = ending_ids[:1], ending_ids[1:]
    logp = token_logprobs(model, context_ids + ending_ids)
    return logp[-len(ending_ids) :]


@dataclass
class TaskScore:
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total

    def interval(self, z: float = 1.96) -> tuple[float, float]:
        """Wilson score interval for the accuracy (95% by default)."""
        n, p = self.total, self.accuracy
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return max(0.0, centre - half), min(1.0, centre + half)


def choose(model, tokenizer, item: Choice) -> int:
    """The index of the ending with the highest mean token log-probability."""
    scores = [float(ending_logprobs(model, tokenizer, item.context, e).mean()) for e in item.endings]
    return max(range(len(scores)), key=scores.__getitem__)


@torch.no_grad()
def score_tasks(model, tokenizer, items: list[Choice]) -> TaskScore:
    correct = sum(choose(model, tokenizer, item) == item.label for item in items)
    return TaskScore(correct, len(items))
