"""The LiVO loss, the Diffusion-DPO loss and min-SNR weights against their formulas and hand-computed cases."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from livo_core.loss import dpo_loss, dpo_loss_terms, livo_loss, livo_loss_terms, min_snr_weights


def _random_errors(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ref_w, ref_l = torch.rand(n, generator=g), torch.rand(n, generator=g)
    # gaps of +-3e-3: around the margins (1/beta = 1e-3, 0.5/alpha = 1e-3), so both hinge branches occur
    theta_w = ref_w + (torch.rand(n, generator=g) - 0.5) * 6e-3
    theta_l = ref_l + (torch.rand(n, generator=g) - 0.5) * 6e-3
    return theta_w, ref_w, theta_l, ref_l


def test_livo_loss_equals_the_formula_on_random_inputs():
    tw, rw, tl, rl = _random_errors()
    got = livo_loss(tw, rw, tl, rl, beta=1000.0, alpha=500.0, gamma1=1.0, gamma2=0.5)
    want = sum(max(0.0, 1.0 + 1000.0 * (a - b)) + max(0.0, 0.5 + 500.0 * (d - c))
               for a, b, c, d in zip(tw.tolist(), rw.tolist(), tl.tolist(), rl.tolist())) / len(tw)
    assert got.item() == pytest.approx(want, rel=1e-5)
    terms = livo_loss_terms(tw, rw, tl, rl)
    assert 0 < terms["share_past_margin"].item() < 1  # the inputs really exercise both branches
    assert terms["hinge_w"].item() + terms["hinge_l"].item() == pytest.approx(got.item(), rel=1e-5)


def test_livo_loss_hand_cases():
    one = torch.tensor([1.0])
    # theta == ref (no value token): the loss is the two margins, gamma1 + gamma2
    assert livo_loss(one, one, one, one).item() == pytest.approx(1.5)
    # aligned 2e-3 better, violating 2e-3 worse: both past their margins -> 0
    terms = livo_loss_terms(one - 2e-3, one, one + 2e-3, one)
    assert terms["loss"].item() == 0.0
    assert terms["share_past_margin"].item() == 1.0
    assert terms["gap_w"].item() == pytest.approx(-2e-3, abs=1e-7)
    assert terms["gap_l"].item() == pytest.approx(2e-3, abs=1e-7)
    # aligned 1e-3 WORSE: hinge_w = 1 + 1000 * 1e-3 = 2; violating unchanged: hinge_l = 0.5
    terms = livo_loss_terms(one + 1e-3, one, one, one)
    assert terms["hinge_w"].item() == pytest.approx(2.0, rel=1e-4)
    assert terms["hinge_l"].item() == pytest.approx(0.5)
    assert terms["loss"].item() == pytest.approx(2.5, rel=1e-4)
    # weights scale the errors inside the hinges: theta == ref stays at the margins whatever the weight
    two = torch.tensor([1.0, 1.0])
    assert livo_loss(two, two, two, two, weights=torch.tensor([1.0, 3.0])).item() == pytest.approx(1.5)
    # aligned 1e-3 worse with weight 3: hinge_w = 1 + 1000 * 3e-3 = 4
    assert livo_loss_terms(one + 1e-3, one, one, one, weights=torch.tensor([3.0]))["hinge_w"].item() == pytest.approx(4.0, rel=1e-4)


def _authors_livo_loss(model_pred, neg_model_pred, ref_model_pred, ref_neg_model_pred, target, neg_target,
                       mse_loss_weights, beta, alpha, gamma_1, gamma_2):
    """Transcribed from the authors' value_encoder/train.py (the snr_gamma branch; `.floaf()` read as `.float()`)."""
    import torch.nn.functional as F

    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    loss = loss.mean(dim=list(range(1, len(loss.shape)))) * mse_loss_weights
    neg_loss = F.mse_loss(neg_model_pred.float(), neg_target.float(), reduction="none")
    neg_loss = neg_loss.mean(dim=list(range(1, len(neg_loss.shape)))) * mse_loss_weights
    ref_loss = F.mse_loss(ref_model_pred.float(), target.float(), reduction="none")
    ref_loss = ref_loss.mean(dim=list(range(1, len(ref_loss.shape)))) * mse_loss_weights
    ref_neg_loss = F.mse_loss(ref_neg_model_pred.float(), neg_target.float(), reduction="none")
    ref_neg_loss = ref_neg_loss.mean(dim=list(range(1, len(ref_neg_loss.shape)))) * mse_loss_weights
    return (torch.clamp(gamma_1 + beta * (loss - ref_loss), min=0)
            + torch.clamp(gamma_2 + alpha * (ref_neg_loss - neg_loss), min=0)).mean()


def test_min_snr_weighted_loss_equals_the_authors_computation():
    from diffusers import DDPMScheduler

    from livo_core.train import pair_errors

    g = torch.Generator().manual_seed(0)
    B = 6
    target = torch.randn(B, 4, 8, 8, generator=g)
    preds = [target + 0.1 * torch.randn(B, 4, 8, 8, generator=g) for _ in range(4)]   # theta_w, theta_l, ref_w, ref_l
    sched = DDPMScheduler(num_train_timesteps=1000)
    t = torch.randint(0, 1000, (B,), generator=g)
    w = min_snr_weights(t, sched, gamma=5.0)
    theta_w, ref_w, theta_l, ref_l = pair_errors(torch.cat([preds[0], preds[1]]), torch.cat([preds[2], preds[3]]),
                                                 torch.cat([target, target]))
    for beta, alpha in ((1000.0, 500.0), (30.0, 30.0)):
        ours = livo_loss(theta_w, ref_w, theta_l, ref_l, beta=beta, alpha=alpha, gamma1=1.0, gamma2=0.5, weights=w)
        theirs = _authors_livo_loss(preds[0], preds[1], preds[2], preds[3], target, target, w, beta, alpha, 1.0, 0.5)
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6), (ours, theirs)


def test_livo_loss_gradient_pushes_aligned_down_and_violating_up():
    tw, rw, tl, rl = (torch.tensor([1.0]) for _ in range(4))
    tw.requires_grad_(True)
    tl.requires_grad_(True)
    livo_loss(tw, rw, tl, rl).backward()
    assert tw.grad.item() == pytest.approx(1000.0)   # d/dtheta_w = beta: lowering theta_w lowers the loss
    assert tl.grad.item() == pytest.approx(-500.0)   # d/dtheta_l = -alpha: raising theta_l lowers the loss


def test_dpo_loss_equals_the_formula():
    tw, rw, tl, rl = _random_errors(seed=1)
    got = dpo_loss(tw, rw, tl, rl, beta_dpo=5000.0)
    want = sum(-math.log(1 / (1 + math.exp(2500.0 * ((a - b) - (c - d)))))
               for a, b, c, d in zip(tw.tolist(), rw.tolist(), tl.tolist(), rl.tolist())) / len(tw)
    assert got.item() == pytest.approx(want, rel=1e-4)
    # theta == ref: log 2; a pair that clearly favours w: ~0
    one = torch.tensor([1.0])
    assert dpo_loss(one, one, one, one).item() == pytest.approx(math.log(2), rel=1e-6)
    assert dpo_loss(one - 1e-2, one, one + 1e-2, one).item() < 1e-10
    assert dpo_loss_terms(one - 1e-3, one, one, one)["share_past_margin"].item() == 1.0


def test_dpo_loss_saturated_pairs_keep_their_value_but_give_no_gradient():
    # gap_w - gap_l = -0.03 -> inside = 75 (saturated); -0.001 -> 2.5 (not)
    theta_w = torch.tensor([0.07, 0.099], requires_grad=True)
    ref_w, theta_l, ref_l = torch.tensor([0.1, 0.1]), torch.tensor([0.1, 0.1]), torch.tensor([0.1, 0.1])
    loss = dpo_loss(theta_w, ref_w, theta_l, ref_l, beta_dpo=5000.0)
    inside = torch.tensor([75.0, 2.5])
    assert torch.allclose(loss, (-torch.nn.functional.logsigmoid(inside)).mean(), rtol=1e-4)
    loss.backward()
    assert theta_w.grad[0] == 0.0 and theta_w.grad[1] > 0


def test_min_snr_weights():
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([0, 10, 500, 999])
    w = min_snr_weights(t, sched, gamma=5.0)
    a = sched.alphas_cumprod[t]
    snr = a / (1 - a)
    assert torch.allclose(w, torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert w[0] < 0.01 and w[-1] == pytest.approx(1.0)   # low noise: capped; high noise: weight 1
    v_sched = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    a = v_sched.alphas_cumprod[t]
    snr = a / (1 - a)
    assert torch.allclose(min_snr_weights(t, v_sched, 5.0), torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))


def _authors_weights(timesteps, scheduler, gamma):
    """Transcribed from the LiVO authors' value_encoder/train.py (min-SNR branch), with diffusers' compute_snr."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    base_weight = torch.stack([snr, gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0] / snr
    if scheduler.config.prediction_type == "v_prediction":
        mse_loss_weights = base_weight + 1
    else:
        mse_loss_weights = base_weight
    mse_loss_weights[snr == 0] = 1.0
    return mse_loss_weights


def _diffusers_weights(timesteps, scheduler, gamma):
    """Transcribed from today's diffusers examples/text_to_image/train_text_to_image.py."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    mse_loss_weights = torch.stack([snr, gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if scheduler.config.prediction_type == "epsilon":
        mse_loss_weights = mse_loss_weights / snr
    elif scheduler.config.prediction_type == "v_prediction":
        mse_loss_weights = mse_loss_weights / (snr + 1)
    return mse_loss_weights


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_formulas_equal_their_transcriptions_and_stay_finite_at_zero_terminal_snr(prediction):
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          prediction_type=prediction)
    t = torch.tensor([0, 10, 300, 500, 999])
    assert torch.allclose(min_snr_weights(t, sched, 5.0, "authors"), _authors_weights(t, sched, 5.0))
    assert torch.allclose(min_snr_weights(t, sched, 5.0, "diffusers"), _diffusers_weights(t, sched, 5.0))
    if prediction == "v_prediction":   # the example: SNR 10, gamma 5 -> 1.5 (authors) vs 0.4545 (diffusers)
        snr = torch.tensor(10.0)
        assert float(torch.clamp(snr, max=5.0) / snr + 1) == pytest.approx(1.5)
        assert float(torch.clamp(snr, max=5.0) / (snr + 1)) == pytest.approx(0.4545, abs=1e-4)
    zero = DDPMScheduler(num_train_timesteps=1000, rescale_betas_zero_snr=True, prediction_type=prediction)
    for formula in ("authors", "diffusers"):
        w = min_snr_weights(torch.tensor([0, 500, 999]), zero, 5.0, formula)
        assert torch.isfinite(w).all() and w[-1] == 1.0        # snr(999) = 0: the authors' weight 1
    assert torch.allclose(min_snr_weights(torch.tensor([0, 500, 999]), zero, 5.0, "authors"),
                          _authors_weights(torch.tensor([0, 500, 999]), zero, 5.0))
