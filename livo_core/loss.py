"""The LiVO loss, the Diffusion-DPO loss (a baseline) and min-SNR weights: pure functions on tensors.

Every loss here takes four 1-D tensors of per-sample denoising errors, one entry per pair:

    theta_w  ||eps - eps_theta(x_t^w, t, [value token; prompt])||^2   aligned image w, with the value token
    ref_w    ||eps - eps_ref(x_t^w, t, prompt)||^2                    aligned image w, frozen SD
    theta_l, ref_l                                                    the same for the violating image l

A negative gap `theta - ref` means the value token makes that image *more* likely under the model
(it is denoised better). LiVO wants the aligned image more likely and the violating image less likely,
each by a margin: hinge terms that are zero once a pair is past its margin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def livo_loss_terms(
    theta_w: torch.Tensor,
    ref_w: torch.Tensor,
    theta_l: torch.Tensor,
    ref_l: torch.Tensor,
    *,
    beta: float = 1000.0,
    alpha: float = 500.0,
    gamma1: float = 1.0,
    gamma2: float = 0.5,
    weights: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """LiVO loss and its parts, for the optimizer (`loss`) and for logging (the rest, detached).

    loss = mean( relu(gamma1 + beta * (theta_w - ref_w))      # aligned: push theta below ref
               + relu(gamma2 + alpha * (ref_l - theta_l)) )   # violating: push theta above ref

    With weights (B,), e.g. min-SNR weights, each of the four denoising errors is scaled by its pair's
    weight INSIDE the hinges, as the authors' training code does (theirs multiplies every MSE by the weight
    before the hinge): the gaps become w * (theta - ref), the margins stay. Returns loss, hinge_w, hinge_l
    (batch means), gap_w, gap_l (mean theta - ref, weighted when weights are given), and
    share_past_margin (share of pairs whose two hinges are both zero).
    """
    gap_w = theta_w - ref_w  # (B,)
    gap_l = theta_l - ref_l  # (B,)
    if weights is not None:
        gap_w, gap_l = weights * gap_w, weights * gap_l
    hinge_w = F.relu(gamma1 + beta * gap_w)  # (B,)
    hinge_l = F.relu(gamma2 - alpha * gap_l)  # (B,) == relu(gamma2 + alpha * (ref_l - theta_l))
    per_pair = hinge_w + hinge_l
    past = (hinge_w == 0) & (hinge_l == 0)
    return {
        "loss": per_pair.mean(),
        "hinge_w": hinge_w.detach().mean(),
        "hinge_l": hinge_l.detach().mean(),
        "gap_w": gap_w.detach().mean(),
        "gap_l": gap_l.detach().mean(),
        "share_past_margin": past.float().mean(),
    }


def livo_loss(theta_w, ref_w, theta_l, ref_l, *, beta=1000.0, alpha=500.0, gamma1=1.0, gamma2=0.5, weights=None) -> torch.Tensor:
    """The LiVO loss (a scalar). See `livo_loss_terms` for the formula and the logged parts."""
    return livo_loss_terms(theta_w, ref_w, theta_l, ref_l, beta=beta, alpha=alpha,
                           gamma1=gamma1, gamma2=gamma2, weights=weights)["loss"]


SATURATED = 50.0  # dpo_loss_terms: logits past this give no gradient (see there)


def dpo_loss_terms(
    theta_w: torch.Tensor,
    ref_w: torch.Tensor,
    theta_l: torch.Tensor,
    ref_l: torch.Tensor,
    *,
    beta_dpo: float = 5000.0,
    weights: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Diffusion-DPO (Wallace et al. 2023) as a baseline, with the same logged parts as LiVO.

    loss = mean( -log sigmoid( -beta_dpo / 2 * ((theta_w - ref_w) - (theta_l - ref_l)) ) )

    One logistic term on the *difference* of the two gaps, no margins: it only asks w to gain relative
    to l. 5000 is Diffusion-DPO's beta for SD 1.5. hinge_w / hinge_l are reported as 0 (no hinges);
    share_past_margin is the share of pairs whose implicit reward favours w (the DPO "accuracy").
    Weights (B,) scale the errors, as in `livo_loss_terms`.
    """
    gap_w = theta_w - ref_w  # (B,)
    gap_l = theta_l - ref_l  # (B,)
    if weights is not None:
        gap_w, gap_l = weights * gap_w, weights * gap_l
    inside = -0.5 * beta_dpo * (gap_w - gap_l)  # (B,)
    # Same value, but no gradient from pairs past inside = 50: theirs is below e^-50 and, once back-propagated
    # through the UNet, lands in denormal floats, which x86 CPUs compute several times slower (the toy world's
    # DPO-encoder ran 800 steps in 240 s vs LiVO's 155 s; with this, 192 vs 199 ms/step) for nothing float32 keeps.
    inside = torch.where(inside > SATURATED, inside.detach(), inside)
    per_pair = -F.logsigmoid(inside)
    zero = torch.zeros((), device=theta_w.device)
    return {
        "loss": per_pair.mean(),
        "hinge_w": zero,
        "hinge_l": zero,
        "gap_w": gap_w.detach().mean(),
        "gap_l": gap_l.detach().mean(),
        "share_past_margin": (inside.detach() > 0).float().mean(),
    }


def dpo_loss(theta_w, ref_w, theta_l, ref_l, *, beta_dpo=5000.0, weights=None) -> torch.Tensor:
    """The Diffusion-DPO loss (a scalar). See `dpo_loss_terms`."""
    return dpo_loss_terms(theta_w, ref_w, theta_l, ref_l, beta_dpo=beta_dpo, weights=weights)["loss"]


def min_snr_weights(timesteps: torch.Tensor, scheduler, gamma: float = 5.0, formula: str = "diffusers") -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for each timestep (B,) -> (B,).

    SNR(t) = alpha_bar_t / (1 - alpha_bar_t); the weight caps the SNR at gamma, so the many easy low-noise
    timesteps stop dominating. Two formulas are in use:
      "diffusers" (default; today's diffusers training scripts): min(SNR, gamma) / SNR for epsilon prediction,
                  min(SNR, gamma) / (SNR + 1) for v-prediction (the paper's weight for a v target);
      "authors"   (the LiVO authors' train.py, from an older diffusers): min(SNR, gamma) / SNR, plus 1 under
                  v-prediction ("floored to an SNR weight of one"): at SNR 10, gamma 5: 1.5 instead of 0.4545.
    Both are identical under epsilon prediction (SD 1.x). At SNR = 0 (the last timestep of a zero-terminal-SNR
    schedule) the weight is 1, as the authors set it: 0 / 0 would make the loss NaN.
    """
    alphas_cumprod = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)
    a = alphas_cumprod[timesteps]
    snr = a / (1.0 - a)  # (B,)
    capped = torch.clamp(snr, max=gamma)
    v_pred = scheduler.config.prediction_type == "v_prediction"
    if formula == "authors":
        weights = capped / snr + (1.0 if v_pred else 0.0)
    elif formula == "diffusers":
        weights = capped / (snr + 1.0) if v_pred else capped / snr
    else:
        raise ValueError(f"unknown min-SNR formula {formula!r}: diffusers or authors")
    return torch.where(snr == 0, torch.ones_like(weights), weights)
