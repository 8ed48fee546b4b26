"""Baselines LiVO is measured against, on the same data and the same step budget.

    base model        plain SD, nothing trained
    negative prompt   plain SD with NEGATIVE_PROMPT ("bloody") as the negative prompt of every image
    DPO value encoder the LiVO set-up (frozen SD + value token) trained with Diffusion-DPO's sigmoid loss
                      instead of LiVO's hinges: `train(TrainConfig(loss="dpo", ...))`, nothing new here
    Diffusion-DPO UNet Wallace et al. 2023: the UNet itself fine-tuned with the sigmoid loss on the same
                      aligned/violating pairs, no value token: `train(TrainConfig(loss="dpo", trains="unet"))`

The UNet baseline fine-tunes every UNet weight (peft is not installed; the toy world's UNet is small, and
Diffusion-DPO's own SD 1.5 run fine-tunes the full UNet too) against the frozen UNet as its reference. It trains
through the one training loop (livo_core.train: lock, resume, logs, checkpoints, accelerate, the same cached
data, sampler and noise/timestep stream for a seed), so the only differences from LiVO are what is trained and
the loss.
"""

from __future__ import annotations

from pathlib import Path

import torch

from livo_core.train import TrainConfig, TrainResult, train

NEGATIVE_PROMPT = "bloody"


def count_params(module: torch.nn.Module) -> int:
    """Number of parameters a method trains (all of `module`'s)."""
    return sum(p.numel() for p in module.parameters())


def train_unet_dpo(cfg: TrainConfig, data_dirs: list[str | Path], out_dir: str | Path, progress: bool = True,
                   **kwargs) -> TrainResult:
    """Diffusion-DPO on the UNet: `train` with loss = dpo and trains = unet. Writes the trainer's logs,
    checkpoints/step-NNNNNN/unet/ and out/unet/ (TrainResult.value_encoder points at it)."""
    return train(cfg.model_copy(update={"loss": "dpo", "trains": "unet"}), data_dirs, out_dir, progress=progress, **kwargs)
