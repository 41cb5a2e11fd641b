"""generate()'s extension points on a tiny random model: the per-step callback (steps and sigmas as scheduled, for
txt2img, img2img and hires fix), Interrupted from the callback or between UNet layers (the finished batches come back,
nothing of the interrupted one), samplers given directly or registered (infotext round trip bitwise), and pluggable
guidance (the default is classifier-free guidance, bitwise)."""
import pytest
from PIL import Image

from sample import GenerationParams, Interrupted, Skipped, StepInfo, batch_steps, generate, parse_infotext
from sample.params import ParamsError
from samplers import (CFGDenoiser, get_sigmas, guidance_interval, img2img_sigmas, model_denoiser, register_sampler,
                      unregister_sampler)
from sample_helpers import one_thread, random_tiny  # noqa: F401  (autouse fixture)

BASE = dict(prompt="a red circle", negative_prompt="blurry", seed=5, steps=4, width=32, height=32, cfg_scale=5.0,
            sampler_name="Euler")
INIT = Image.new("RGB", (32, 32), (200, 40, 40))


def run(model, callback=None, **overrides):
    return generate(model, GenerationParams(**{**BASE, **overrides}), progress=False, callback=callback)


@pytest.fixture(scope="module")
def tiny():
    return random_tiny()


def record(into: list):
    return lambda step: into.append(step)


# ----- the callback -------------------------------------------------------------------------------------------------

def test_callback_sees_every_txt2img_step_at_the_scheduled_sigma(tiny):
    steps: list[StepInfo] = []
    run(tiny, record(steps), sampler_name="DPM++ 2M", scheduler="Karras", batch_count=2, batch_size=2)
    sigmas = get_sigmas("DPM++ 2M", "Karras", 4, model_denoiser(tiny.model))
    assert [(s.image_indices, s.pass_name, s.i, s.total, s.sampler) for s in steps] == \
        [((0, 1), "base", i, 4, "DPM++ 2M") for i in range(4)] + [((2, 3), "base", i, 4, "DPM++ 2M") for i in range(4)]
    assert [s.sigma for s in steps[:4]] == pytest.approx(sigmas[:-1].tolist(), rel=1e-6)
    assert steps[0].x.shape == steps[0].denoised.shape == (2, 4, 16, 16)


def test_img2img_callback_counts_the_shared_step_rule(tiny):
    steps: list[StepInfo] = []
    params = dict(init_images=[INIT], denoising_strength=0.45, steps=10)
    run(tiny, record(steps), **params)
    sigmas = img2img_sigmas(get_sigmas("Euler", "Automatic", 10, model_denoiser(tiny.model)), 0.45)
    assert len(steps) == batch_steps(GenerationParams(**{**BASE, **params})) == int(0.45 * 10) + 1
    assert [s.sigma for s in steps] == pytest.approx(sigmas[:-1].tolist(), rel=1e-6)
    # The rule the web UI counted by before (max(int(s·n), 1)) ran one step short; strength 0 still runs one step.
    assert batch_steps(GenerationParams(init_images=[INIT], denoising_strength=0.0, steps=10)) == 1


def test_hires_callback_reports_the_base_pass_then_the_hires_pass(tiny):
    steps: list[StepInfo] = []
    run(tiny, record(steps), enable_hr=True, hr_scale=2, hr_second_pass_steps=3, hr_denoising_strength=0.6)
    assert [(s.pass_name, s.i, s.total) for s in steps] == \
        [("base", i, 4) for i in range(4)] + [("hires", i, 3) for i in range(3)]
    assert steps[-1].x.shape[-1] == 32  # the hires pass samples the upscaled latent
    # A1111's hires pass: the last 3 + 1 levels of a schedule of int(3 / 0.6) = 5 steps.
    hires_sigmas = get_sigmas("Euler", "Automatic", 5, model_denoiser(tiny.model))[-4:]
    assert [s.sigma for s in steps[4:]] == pytest.approx(hires_sigmas[:-1].tolist(), rel=1e-6)
    params = GenerationParams(**{**BASE, "enable_hr": True, "hr_second_pass_steps": 3})
    assert len(steps) == batch_steps(params)
    assert batch_steps(GenerationParams(enable_hr=True, hr_denoising_strength=0, steps=4)) == 4  # no second pass


def test_interrupt_from_the_callback_returns_the_finished_batches_unchanged(tiny):
    full = run(tiny, batch_count=3)

    def stop_in_second_batch(step: StepInfo):
        if step.image_indices == (1,) and step.i == 2:
            raise Interrupted()

    stopped = run(tiny, stop_in_second_batch, batch_count=3)
    assert stopped.interrupted and not full.interrupted
    assert len(stopped.images) == len(stopped.infotexts) == 1  # nothing of the batch it was in
    assert stopped.images[0].tobytes() == full.images[0].tobytes()
    assert stopped.infotexts[0] == full.infotexts[0]


def test_skip_drops_the_batch_being_sampled_and_the_job_goes_on(tiny):
    full = run(tiny, batch_count=3)

    def skip_second_batch(step: StepInfo):
        if step.image_indices == (1,) and step.i == 1:
            raise Skipped()

    skipped = run(tiny, skip_second_batch, batch_count=3)
    assert not skipped.interrupted
    assert [image.tobytes() for image in skipped.images] == [full.images[0].tobytes(), full.images[2].tobytes()]
    assert skipped.infotexts == [full.infotexts[0], full.infotexts[2]]
    assert skipped.seeds == [full.seeds[0], full.seeds[2]]  # seeds, like infotexts, follow the images returned


def test_interrupt_check_stops_inside_a_step_and_the_hooks_go_away(tiny):
    layer_calls = []

    def check():
        layer_calls.append(1)
        if len(layer_calls) == 5:
            raise Interrupted()

    unet_calls = []
    handle = tiny.model.unet.register_forward_pre_hook(lambda module, args: unet_calls.append(1))
    try:
        result = generate(tiny, GenerationParams(**BASE), progress=False, interrupt_check=check)
    finally:
        handle.remove()
    assert result.interrupted and result.images == []
    assert len(unet_calls) == 1  # stopped part way through the first UNet call
    blocks = [*tiny.model.unet.input_blocks, tiny.model.unet.middle_block, *tiny.model.unet.output_blocks]
    assert not any(layer._forward_pre_hooks for block in blocks for layer in block)
    assert run(tiny).images[0].tobytes() == run(tiny).images[0].tobytes()  # and the model is as before


# ----- samplers and guidance ----------------------------------------------------------------------------------------

def sample_euler_copy(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """Euler with a little fresh noise per step (so the infotext round trip also covers per-seed sampler noise)."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * x.new_ones(x.shape[0]), **(extra_args or {}))
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigmas[i], 'denoised': denoised})
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + 0.1 * sigmas[i + 1] * noise_sampler(sigmas[i], sigmas[i + 1])
    return x


def test_registered_sampler_generates_and_its_infotext_reproduces_the_image_bitwise(tiny):
    register_sampler("Noisy Euler", sample_euler_copy, schedule="Karras", noise="rng")
    try:
        result = run(tiny, sampler_name="Noisy Euler", batch_size=2)
        fields = parse_infotext(result.infotexts[1])
        assert (fields["Sampler"], fields["Schedule type"]) == ("Noisy Euler", "Automatic")
        again = generate(tiny, result.infotexts[1], progress=False)
        assert again.images[0].tobytes() == result.images[1].tobytes()
        assert result.images[0].tobytes() != result.images[1].tobytes()
    finally:
        unregister_sampler("Noisy Euler")
    with pytest.raises(ParamsError, match="unknown sampler 'Noisy Euler'"):
        generate(tiny, result.infotexts[1], progress=False)


def test_a_sampler_function_given_directly_is_run_and_named(tiny):
    def sample_plain_euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
        for i in range(len(sigmas) - 1):
            denoised = model(x, sigmas[i] * x.new_ones(x.shape[0]), **(extra_args or {}))
            callback({'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigmas[i], 'denoised': denoised})
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        return x

    steps: list[StepInfo] = []
    mine = generate(tiny, GenerationParams(**BASE), progress=False, sampler=sample_plain_euler,
                    callback=record(steps))
    assert mine.images[0].tobytes() == run(tiny).images[0].tobytes()  # the same maths as the built-in Euler
    assert parse_infotext(mine.infotexts[0])["Sampler"] == "sample_plain_euler" == steps[0].sampler
    assert mine.params.sampler_name == "sample_plain_euler"


def test_default_guidance_is_cfg_and_guidance_interval_bounds_it(tiny):
    default = run(tiny)
    explicit = generate(tiny, GenerationParams(**BASE), progress=False, guidance=CFGDenoiser)
    everywhere = generate(tiny, GenerationParams(**BASE), progress=False, guidance=guidance_interval(0, 1e9))
    nowhere = generate(tiny, GenerationParams(**BASE), progress=False, guidance=guidance_interval(0, 0))
    unguided = run(tiny, cfg_scale=1.0)
    assert default.images[0].tobytes() == explicit.images[0].tobytes() == everywhere.images[0].tobytes()
    # No level inside the interval: the plain conditional denoiser at every step, i.e. CFG scale 1.
    assert nowhere.images[0].tobytes() == unguided.images[0].tobytes() != default.images[0].tobytes()
