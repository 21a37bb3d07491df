"""TensorBoard scalars, a JSON-lines metrics log and a progress bar (steps/s, ETA, loss)."""

from __future__ import annotations

import json
import os
from typing import Mapping


class MetricWriter:
    """Writes scalars to TensorBoard (tensorboardX, no TensorFlow needed) and WORKDIR/metrics.jsonl."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        if enabled:
            from tensorboardX import SummaryWriter

            os.makedirs(workdir, exist_ok=True)
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

    def scalars(self, step: int, values: Mapping[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self._tb.add_scalar(f"{prefix}/{name}", float(value), step)
        self._jsonl.write(json.dumps({"step": step, "split": prefix, **{k: float(v) for k, v in values.items()}}) + "\n")
        self._jsonl.flush()

    def flush(self) -> None:
        if self.enabled:
            self._tb.flush()
            self._jsonl.flush()


class ProgressBar:
    """tqdm bar over optimizer steps; shows steps/s and ETA (tqdm) and the last logged loss."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True):
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=1.0)

    def update(self, step: int, summary: Mapping[str, float]) -> None:
        if self._bar is None:
            return
        self._bar.update(step - self._bar.n)
        self._bar.set_postfix(loss=f"{summary['loss']:.4f}", lr=f"{summary.get('lr', 0):.2e}", refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
