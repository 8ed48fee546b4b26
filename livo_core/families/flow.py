"""Training noise of the flow-matching families (SD 3.x, FLUX), for their Backbone classes to mix in.

    sigma ~ a logit-normal draw, snapped to the scheduler's grid (as diffusers' SD3 / FLUX training scripts:
            u = sigmoid(N(logit_mean, logit_std)), index = int(u * num_train_timesteps), t = timesteps[index])
    x_sigma = (1 - sigma) * x0 + sigma * noise;   target = the velocity noise - x0
LiVO's hinge then compares per-sample velocity errors ||v_hat(x_sigma, sigma, c) - (noise - x0)||^2 exactly as it
compares epsilon errors (livo_core.train.pair_errors). Its margins (gamma, in epsilon-MSE units today) are still to
be re-derived for velocity errors: no flow-matching family is registered yet.
"""

from __future__ import annotations

import torch


class FlowMatchingNoise:
    """`sample_timesteps` and `noised` of a flow-matching Backbone (FlowMatchEulerDiscreteScheduler)."""

    logit_mean = 0.0
    logit_std = 1.0

    def sample_timesteps(self, noise_scheduler, n: int, generator: torch.Generator) -> torch.Tensor:
        u = torch.sigmoid(torch.normal(mean=self.logit_mean, std=self.logit_std, size=(n,), generator=generator))
        indices = (u * noise_scheduler.config.num_train_timesteps).long()
        return noise_scheduler.timesteps[indices]

    def sigmas(self, noise_scheduler, t: torch.Tensor, n_dim: int, dtype) -> torch.Tensor:
        """The sigma of each timestep on the scheduler's grid, shaped to broadcast over latents of `n_dim` dims."""
        grid = noise_scheduler.timesteps.to(t.device)
        index = torch.stack([(grid == x).nonzero().squeeze() for x in t])
        sigma = noise_scheduler.sigmas.to(t.device, dtype)[index].flatten()
        return sigma.view(-1, *([1] * (n_dim - 1)))

    def noised(self, noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
        sigma = self.sigmas(noise_scheduler, t, latents.ndim, latents.dtype)
        return (1.0 - sigma) * latents + sigma * noise, noise - latents
