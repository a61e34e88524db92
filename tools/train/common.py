"""Small pieces shared by the training stages: the run log, seeding, the
wall-clock budget, the learning-rate schedule and safe checkpoint writes."""

import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch


class RunLog:
    """Prints a line and appends it to `train_log.txt` in the output folder.

    Every line carries the seconds since the run started, so the log shows
    where the wall-clock budget went."""

    def __init__(self, path: Path):
        self.path = path
        self.start = time.monotonic()
        self.file = open(path, "a", encoding="utf-8")

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def __call__(self, msg: str) -> None:
        line = f"[{self.elapsed():7.1f}s] {msg}"
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def seed_everything(seed: int) -> None:
    """Fixes the seeds of Python, NumPy and PyTorch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


class Budget:
    """A wall-clock budget in seconds, started at construction."""

    def __init__(self, seconds: float, start: float | None = None):
        self.seconds = max(float(seconds), 0.0)
        self.start = time.monotonic() if start is None else start

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def fraction(self) -> float:
        """Part of the budget spent, in [0, 1]."""
        if self.seconds <= 0:
            return 1.0
        return min(self.elapsed() / self.seconds, 1.0)

    def done(self) -> bool:
        return self.elapsed() >= self.seconds


def cosine_lr(peak: float, step: int, warmup_steps: int, progress: float,
              final_ratio: float = 0.1) -> float:
    """Linear warm-up over `warmup_steps` steps, then a cosine from `peak` down
    to `final_ratio * peak` over the budget (`progress` in [0, 1] is the part
    of the wall-clock budget spent, so the schedule ends when time does)."""
    warm = min(1.0, (step + 1) / max(warmup_steps, 1))
    cos = 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return peak * warm * (final_ratio + (1.0 - final_ratio) * cos)


def param_groups(model: torch.nn.Module, weight_decay: float, no_decay_names=()):
    """AdamW parameter groups: weight decay on matrices (and stacked expert
    tensors), none on norms, biases, sinks and the parameters named in
    `no_decay_names` (substring match, e.g. the embedding table)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or any(s in name for s in no_decay_names):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def replace_dir(tmp: Path, final: Path) -> None:
    """Moves a fully written folder `tmp` to `final`, replacing an older one,
    so that `final` is never half written."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def write_json(path: Path, value) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def folder_mb(path: Path) -> float:
    """Size of the `.safetensors` files of a folder, in MB (10^6 bytes)."""
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e6


def versions() -> dict:
    import tokenizers
    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }
