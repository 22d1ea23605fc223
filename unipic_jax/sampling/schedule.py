"""The MAR unmasking schedule, computed in Python once per (grid, num_iter).

The reference reveals tokens on a cosine schedule (spec §8.3): before step k, `masked[k]` tokens
are still unknown; after it, the first `mask_len[k]` entries of each row's generation order stay
masked, so the step predicts `order[mask_len[k] : masked[k]]`. None of these counts depend on
random draws, so every per-step shape of the sampler is a Python int known before tracing.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class Step:
    """Static sizes of one MAR iteration (per row)."""

    index: int
    masked: int      # still-masked tokens at the start of the step
    mask_len: int    # tokens left masked after the step (0 after the last step)
    visible: int     # tokens the MAR encoder / LLM see: num_tokens - masked
    predicted: int   # tokens the diffusion head samples this step: masked - mask_len


def mask_schedule(num_tokens: int, num_iter: int) -> tuple[Step, ...]:
    """Per-step token counts for a grid of `num_tokens` tokens revealed in `num_iter` steps.

    `mask_len = floor(num_tokens * cos(pi/2 * (k+1)/num_iter))` in float64, clamped to
    `[1, masked - 1]`; the last step predicts every token still masked.
    """
    if num_tokens < 1 or num_iter < 1:
        raise ValueError(f"need num_tokens >= 1 and num_iter >= 1, got {num_tokens}, {num_iter}")
    steps, masked = [], num_tokens
    for k in range(num_iter):
        if k == num_iter - 1:
            mask_len = 0
        else:
            ratio = np.cos(math.pi / 2.0 * (k + 1) / num_iter)
            mask_len = max(1, min(masked - 1, int(np.floor(num_tokens * ratio))))
        steps.append(Step(k, masked, mask_len, num_tokens - masked, masked - mask_len))
        masked = mask_len
    return tuple(steps)


def cfg_scales(cfg: float, schedule: str, steps: tuple[Step, ...], num_tokens: int) -> list[float]:
    """Guidance scale per step: "constant" (cfg) or "linear" (Muse: 1 + (cfg-1)(N - mask_len)/N).

    The reference evaluates the linear value in float32 from the clamped mask length; at the last
    step that length is clamped up to 1 (cos(pi/2) floors to 0) although every token is predicted.
    """
    if schedule == "constant":
        return [float(cfg)] * len(steps)
    if schedule == "linear":
        n = np.float32(num_tokens)
        lens = [s.mask_len if s.index < len(steps) - 1 else 1 for s in steps]
        return [float(np.float32(1) + np.float32(cfg - 1) * (n - np.float32(m)) / n) for m in lens]
    raise ValueError(f"cfg_schedule must be 'constant' or 'linear', got {schedule!r}")
