"""The metrics log, DIR/metrics.jsonl: one JSON line per optimizer step, plus validation and sample lines."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tegaki.errors import TegakiError
from tegaki.files import atomic_write_text, explain_os_error


class MetricsLog:
    """metrics.jsonl: one JSON object per line, appended as the run goes. A resumed run first drops
    the lines written after its checkpoint (they belonged to the interrupted attempt), so every step
    appears once and in order; that rewrite is atomic, so a kill during it loses no history."""

    def __init__(self, path: Path, start_step: int, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        kept = [line for line, record in _metric_lines(path) if start_step > 0 and record.get("step", 0) <= start_step]
        atomic_write_text(path, "".join(line + "\n" for line in kept))
        try:
            self.file = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - kept open for the run
        except OSError as e:
            raise explain_os_error(path, e) from None

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self.file.write(json.dumps(record, ensure_ascii=False) + "\n")

    def close(self) -> None:
        if self.enabled:
            self.file.close()


def _metric_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) for every line of a metrics.jsonl that is a JSON object with an integer step.
    Anything else (the half-written last line of a killed run, garbage) is skipped."""
    try:
        text = Path(path).read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    except OSError as e:
        raise explain_os_error(path, e, doing="read") from None
    lines = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and type(record.get("step", 0)) is int:
            lines.append((line, record))
    return lines


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of a metrics.jsonl, in file order. A line that is not a JSON object with an
    integer step (the half-written last line of a killed run) is skipped.

    Records: {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "dt"} per optimizer step;
    {"step", "kind": "val", "val_loss", "val_bpb"} per validation; {"step", "kind": "sample", "text"}."""
    if not Path(path).exists():
        raise TegakiError(f"{path} does not exist; is it a run folder that has trained a step?")
    return [record for _, record in _metric_lines(Path(path))]
