"""Flow-matching training noise (livo_core/families/flow.py) against a transcription of diffusers' SD3 / FLUX
training scripts (train_dreambooth_lora_sd3.py: compute_density_for_timestep_sampling, get_sigmas, the noisy input
and the target)."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling

from livo_core.families.flow import FlowMatchingNoise


def test_timesteps_noisy_input_and_velocity_target_match_the_sd3_script():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    x0, noise = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)

    # the script's lines, transcribed
    u = compute_density_for_timestep_sampling(weighting_scheme="logit_normal", batch_size=6, logit_mean=0.0, logit_std=1.0,
                                              generator=torch.Generator().manual_seed(7))
    indices = (u * sched.config.num_train_timesteps).long()
    timesteps = sched.timesteps[indices]
    step_indices = [(sched.timesteps == t).nonzero().item() for t in timesteps]
    sigmas = sched.sigmas[step_indices].flatten()
    while len(sigmas.shape) < x0.ndim:
        sigmas = sigmas.unsqueeze(-1)
    noisy_theirs = (1.0 - sigmas) * x0 + sigmas * noise
    target_theirs = noise - x0

    flow = FlowMatchingNoise()
    t = flow.sample_timesteps(sched, 6, torch.Generator().manual_seed(7))
    noisy, target = flow.noised(sched, x0, noise, t)
    assert torch.equal(t, timesteps)
    assert torch.equal(noisy, noisy_theirs) and torch.equal(target, target_theirs)
    assert 0 < float(sigmas.min()) and float(sigmas.max()) <= 1
