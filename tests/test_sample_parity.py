"""One whole txt2img run against diffusers' StableDiffusionPipeline built from the same random tiny weights.

The pipeline is assembled from diffusers' and transformers' own classes and converters (UNet, VAE, CLIP text model,
a transformers CLIPTokenizer built offline from open_clip's vocabulary file) with the Euler scheduler; both sides get
the same initial noise, prompt, negative prompt and CFG scale. 4 steps on the default "Uniform" schedule put every step
on an integer timestep (999, 666, 333, 0), where diffusers' linear and k-diffusion's log-linear sigma interpolation
agree. Tolerance: our 8-bit image is diffusers' float image truncated to 8 bits (A1111's conversion), up to 1e-4 of
float32 round-off accumulated through 4 CFG steps and the VAE (observed: exact truncation to 3e-8).
"""
import numpy as np
import torch

from sample import GenerationParams, generate
from sample_helpers import diffusers_pipeline, one_thread, random_tiny  # noqa: F401  (autouse fixture)


def test_txt2img_matches_diffusers_stable_diffusion_pipeline():
    checkpoint = random_tiny()
    model = checkpoint.model
    params = GenerationParams(prompt="a red circle on a white background", negative_prompt="blurry",
                              sampler_name="Euler", scheduler="Uniform", steps=4, cfg_scale=6.0, width=32, height=32,
                              seed=1234)
    ours = generate(checkpoint, params, progress=False).images[0]

    pipeline = diffusers_pipeline(model)
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1234))  # the seed's CPU noise
    with torch.no_grad():
        theirs = pipeline(params.prompt, negative_prompt=params.negative_prompt, num_inference_steps=4,
                          guidance_scale=6.0, height=32, width=32, latents=noise, output_type="np").images[0]
    ours = np.asarray(ours, dtype=np.float64) / 255
    truncation = theirs - ours  # in [0, 1/255) if ours is exactly theirs truncated to 8 bits
    assert truncation.min() > -1e-4 and truncation.max() < 1 / 255 + 1e-4
    assert theirs.std() > 0.1  # a real image, not a saturated one
