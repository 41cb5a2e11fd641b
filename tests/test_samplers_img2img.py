"""samplers.img2img: schedule truncation by denoising strength, the starting latent, inpainting blends, mask blur."""

import pytest
import torch
from scipy import ndimage

import samplers
from sampler_oracles import GaussianProblem


@pytest.mark.parametrize('strength,steps_run', [(0.75, 16), (0.5, 11), (1.0, 20), (0.999, 20), (0.3, 7), (0.0, 1)])
def test_img2img_runs_the_a1111_number_of_steps_from_the_tail_of_the_schedule(strength, steps_run):
    """A1111: t_enc = int(min(strength, 0.999) * steps), sampling from sigmas[steps - t_enc - 1]: t_enc + 1 steps."""
    sigmas = samplers.get_sigmas_karras(20, 0.0292, 14.6146)
    tail = samplers.img2img_sigmas(sigmas, strength)
    assert len(tail) - 1 == steps_run
    assert torch.equal(tail, sigmas[20 - steps_run:])


def test_initial_latent_noises_the_image_to_the_first_level_with_the_multiplier():
    init, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(samplers.initial_latent(init, noise, torch.tensor(3.0), noise_multiplier=1.05),
                               init + noise * 3.15)


def inpaint(mask, problem, init, noise, sigmas):
    model = samplers.InpaintingDenoiser(problem.denoiser, init, mask, noise)
    x = samplers.initial_latent(init, noise, sigmas[0])
    return samplers.sample_dpmpp_2m(model, x, sigmas, disable=True)


def test_inpainting_keeps_the_original_exactly_where_the_mask_is_zero():
    problem = GaussianProblem(shape=(1, 3, 8, 8))
    sigmas = samplers.get_sigmas_karras(12, 0.0292, 14.6146)
    init, noise = torch.randn(1, 3, 8, 8) + 2.0, torch.randn(1, 3, 8, 8)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1
    out = inpaint(mask, problem, init, noise, sigmas)
    kept = mask.expand_as(out) == 0
    torch.testing.assert_close(out[kept], init[kept], rtol=0, atol=1e-5)
    # The hole is regenerated towards the data distribution (mean mu), away from the original (mean 2).
    hole = ~kept
    assert (out[hole] - init[hole]).abs().mean() > 1.0


def test_inpainting_with_a_full_mask_is_plain_sampling():
    problem = GaussianProblem(shape=(1, 3, 8, 8))
    sigmas = samplers.get_sigmas_karras(12, 0.0292, 14.6146)
    init, noise = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    out = inpaint(torch.ones(1, 1, 8, 8), problem, init, noise, sigmas)
    plain = samplers.sample_dpmpp_2m(problem.denoiser, samplers.initial_latent(init, noise, sigmas[0]), sigmas,
                                     disable=True)
    assert torch.equal(out, plain)


def test_apply_mask_takes_the_original_outside_the_mask():
    x, init = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    mask = torch.tensor([1.0, 0.0, 0.25, 1.0]).reshape(1, 1, 1, 4)
    torch.testing.assert_close(samplers.apply_mask(x, init, mask), init + mask * (x - init))


@pytest.mark.parametrize('blur_x,blur_y', [(4.0, 4.0), (1.5, 6.0), (0.0, 3.0)])
def test_mask_blur_is_a1111s_gaussian_blur_with_mirrored_borders(blur_x, blur_y):
    """A1111 blurs with OpenCV: kernel size 2 int(2.5 sigma + 0.5) + 1, BORDER_REFLECT_101 (scipy's 'mirror');
    scipy's radius int(truncate sigma + 0.5) equals it with truncate = 2.5."""
    mask = (torch.rand(2, 1, 40, 48, generator=torch.Generator().manual_seed(0)) > 0.7).float()
    ours = samplers.blur_mask(mask, blur_x, blur_y)
    reference = ndimage.gaussian_filter(mask.double().numpy(), sigma=(0, 0, blur_y, blur_x), mode='mirror',
                                        truncate=2.5)
    torch.testing.assert_close(ours, torch.from_numpy(reference).float(), rtol=0, atol=1e-6)


def test_mask_blur_wider_than_the_mask_is_refused():
    with pytest.raises(ValueError, match='mask blur'):
        samplers.blur_mask(torch.zeros(1, 1, 8, 8), 10.0)


def test_latent_mask_averages_8x8_blocks_and_rounds():
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8, :8] = 1          # a full block
    mask[..., 8:, :5] = 1          # 5/8 of a block -> rounds to 1
    mask[..., :8, 8:11] = 1        # 3/8 of a block -> rounds to 0
    assert samplers.latent_mask(mask, (2, 2)).flatten().tolist() == [1.0, 0.0, 1.0, 0.0]
    assert samplers.latent_mask(mask, (2, 2), round_mask=False).flatten().tolist() == [1.0, 0.375, 0.625, 0.0]
