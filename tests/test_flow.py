import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from fusedit.flow import (
    FlowMatchSchedule,
    flow_matching_loss,
    interpolate,
    loss_weighting,
    shift_sigmas,
    velocity_target,
)


def test_reference_sampling_matches_the_reference_computation():
    schedule = FlowMatchSchedule(shift=3.0)
    ours = schedule.sample_sigmas(4096, torch.Generator().manual_seed(7), method="reference")

    # The reference trainer's computation (diffusion/trainers.py), with an explicit generator.
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    u = compute_density_for_timestep_sampling(
        "logit_normal", 4096, logit_mean=0.0, logit_std=1.0, generator=torch.Generator().manual_seed(7)
    )
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices]
    step_indices = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]
    expected = scheduler.sigmas[step_indices]
    assert torch.equal(ours, expected)
    assert torch.equal(schedule.timesteps_for(ours), timesteps)
    assert ours.min() > 0 and ours.max() <= 1


def test_reference_sampling_is_reproducible_and_advances_the_generator():
    schedule = FlowMatchSchedule()
    g = torch.Generator().manual_seed(0)
    a = schedule.sample_sigmas(8, g)
    b = schedule.sample_sigmas(8, g)
    assert not torch.equal(a, b)
    assert torch.equal(a, schedule.sample_sigmas(8, torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("method", ["uniform", "logit_normal", "mode"])
def test_continuous_methods_match_diffusers_density_then_shift(method):
    schedule = FlowMatchSchedule(shift=3.0)
    ours = schedule.sample_sigmas(512, torch.Generator().manual_seed(3), method=method, mode_scale=1.29)
    u = compute_density_for_timestep_sampling(
        method, 512, logit_mean=0.0, logit_std=1.0, mode_scale=1.29, generator=torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(ours, shift_sigmas(u, 3.0))
    unshifted = schedule.sample_sigmas(512, torch.Generator().manual_seed(3), method=method, apply_shift=False)
    torch.testing.assert_close(unshifted, u)
    assert ((ours >= 0) & (ours <= 1)).all()


def test_shift_moves_mass_towards_noise():
    schedule = FlowMatchSchedule(shift=3.0)
    s = schedule.sample_sigmas(10000, torch.Generator().manual_seed(0), method="logit_normal")
    u = schedule.sample_sigmas(10000, torch.Generator().manual_seed(0), method="logit_normal", apply_shift=False)
    assert s.mean() > u.mean() + 0.1


def test_unknown_method_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown method 'cosine'"):
        FlowMatchSchedule().sample_sigmas(2, method="cosine")


def test_interpolation_endpoints_and_target():
    x0 = torch.randn(3, 4, 5, 5)
    noise = torch.randn(3, 4, 5, 5)
    assert torch.equal(interpolate(x0, noise, torch.zeros(3)), x0)
    assert torch.equal(interpolate(x0, noise, torch.ones(3)), noise)
    mid = interpolate(x0, noise, torch.tensor([0.25, 0.5, 0.75]))
    torch.testing.assert_close(mid[1], 0.5 * (x0[1] + noise[1]))
    torch.testing.assert_close(mid[2], 0.25 * x0[2] + 0.75 * noise[2])
    # d x_t / d sigma is the velocity target
    torch.testing.assert_close(
        interpolate(x0, noise, torch.full((3,), 0.6)) - interpolate(x0, noise, torch.full((3,), 0.4)),
        0.2 * velocity_target(x0, noise),
        atol=1e-6,
        rtol=1e-5,
    )
    with pytest.raises(ValueError, match=r"sigma must have shape \(B,\)"):
        interpolate(x0, noise, torch.zeros(2))


def test_euler_sampling_with_the_exact_velocity_recovers_x0():
    torch.manual_seed(0)
    x0 = torch.randn(2, 3, 8, 8)
    noise = torch.randn(2, 3, 8, 8)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(7)
    schedule = FlowMatchSchedule(shift=3.0)
    x = noise.clone()
    for i, t in enumerate(scheduler.timesteps):
        sigma = t / 1000
        # the sample at this step lies on the path, and the timestep convention is sigma * 1000
        torch.testing.assert_close(x, interpolate(x0, noise, sigma.expand(2)), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(schedule.timesteps_for(scheduler.sigmas[i]), t)
        x = scheduler.step(velocity_target(x0, noise), t, x).prev_sample
    torch.testing.assert_close(x, x0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap"])
def test_loss_weighting_matches_sd3(scheme):
    sigmas = torch.linspace(0.05, 1.0, 20)
    torch.testing.assert_close(loss_weighting(sigmas, scheme), compute_loss_weighting_for_sd3(scheme, sigmas))


def test_loss_weighting_rejects_unknown_scheme():
    with pytest.raises(ValueError, match="unknown scheme"):
        loss_weighting(torch.ones(2), "logit")


def test_flow_matching_loss():
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.stack([torch.ones(1, 2, 2), 2 * torch.ones(1, 2, 2)])
    assert flow_matching_loss(pred, target).item() == pytest.approx((1 + 4) / 2)
    assert flow_matching_loss(pred, target, torch.tensor([2.0, 0.5])).item() == pytest.approx((2 + 2) / 2)
    assert flow_matching_loss(pred.bfloat16(), target).dtype == torch.float32
    with pytest.raises(ValueError, match="weights must have shape"):
        flow_matching_loss(pred, target, torch.ones(3))
    assert math.isnan(flow_matching_loss(pred * float("nan"), target).item())


def test_uniform_fraction_mixes_in_unshifted_uniform_sigmas():
    schedule = FlowMatchSchedule(shift=6.0)
    plain = schedule.sample_sigmas(20000, torch.Generator().manual_seed(0))
    # off: the same random stream as before the option existed
    torch.testing.assert_close(
        schedule.sample_sigmas(20000, torch.Generator().manual_seed(0), uniform_fraction=0.0), plain
    )
    mixed = schedule.sample_sigmas(20000, torch.Generator().manual_seed(0), uniform_fraction=0.25)
    # shift 6 almost never visits σ < 0.2 (0.1 %); a quarter of uniform draws puts 0.25 · 0.2 = 5 % there
    assert (plain < 0.2).float().mean() < 0.005
    assert abs((mixed < 0.2).float().mean().item() - 0.05) < 0.01
    with pytest.raises(ValueError, match="uniform_fraction"):
        schedule.sample_sigmas(4, uniform_fraction=1.5)
