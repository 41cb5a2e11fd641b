"""generate(..., compile=...): the UNet and VAE decoder through torch.compile (sample/compiled.py).

Compiling with inductor takes minutes per graph on a loaded 2-core CPU (measured: 345 s for the tiny UNet at one
shape), so the default test compiles with TorchDynamo's "eager" backend: the whole capture runs (fullgraph=True, so
a graph break anywhere in the UNet, the kernel dispatch or the VAE decoder fails the test) and the captured graphs
run as PyTorch ops, so its output must equal the eager path bitwise. The inductor tests are marked slow.
"""
import logging

import numpy as np
import pytest
import torch

from sample import GenerationParams, generate
from sample_helpers import one_thread, random_tiny, write_random_lora  # noqa: F401  (autouse fixture)

BASE = dict(prompt="a red circle", negative_prompt="blurry", seed=5, steps=3, width=32, height=32, cfg_scale=5.0,
            sampler_name="Euler")
INIT = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def run(model, compile=False, interrupt_check=None, **overrides):
    return generate(model, GenerationParams(**{**BASE, **overrides}), progress=False, compile=compile,
                    interrupt_check=interrupt_check)


def pixels(result) -> np.ndarray:
    return np.stack([np.asarray(image).astype(np.int16) for image in result.images])


@pytest.fixture
def dynamo_capture_only(monkeypatch):
    """torch.compile as sample.compiled calls it, but with the "eager" backend and fullgraph=True."""
    real_compile = torch.compile

    def capture(function, mode=None, dynamic=None):
        return real_compile(function, backend="eager", dynamic=dynamic, fullgraph=True)

    monkeypatch.setattr(torch, "compile", capture)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_generation_captures_whole_graphs_equals_eager_checks_interrupts_and_logs_a_recompile(dynamo_capture_only, caplog):
    model = random_tiny()  # its own model: the compiled functions are cached on it
    state_keys = list(model.model.state_dict())
    eager = run(model)
    checks = []
    with caplog.at_level(logging.INFO, logger="sample.compiled"):
        compiled = run(model, compile=True, interrupt_check=lambda: checks.append(1))
    assert np.array_equal(pixels(compiled), pixels(eager))
    # interrupt_check runs before every UNet call instead of every layer: Euler makes one (CFG-batched) call a step.
    assert len(checks) == BASE["steps"]
    assert compiled.infotexts == eager.infotexts
    assert [record.levelname for record in caplog.records] == ["INFO", "INFO"]  # the UNet's and decoder's compiles
    # The swap is undone after the job: no instance attributes left, the module tree and keys unchanged.
    unet, vae = model.model.unet, model.model.vae
    assert "forward" not in unet.__dict__ and "_decode" not in vae.__dict__
    assert list(model.model.state_dict()) == state_keys

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sample.compiled"):
        again = run(model, compile=True)  # the same shapes: cached, nothing compiled or logged
        assert caplog.records == []
        batch = run(model, compile=True, batch_size=2)  # new shapes: a recompile, logged as a warning
    assert np.array_equal(pixels(again), pixels(eager))
    assert np.array_equal(pixels(batch), pixels(run(model, batch_size=2)))
    recompiles = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert len(recompiles) == 2 and recompiles[0].startswith("new input shapes for the compiled UNet: [4, 4, 16, 16]")


def test_unknown_compile_mode_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="compile mode 'fastest' is not one of default, reduce-overhead"):
        run(random_tiny(), compile="fastest")


# Inductor (what users get): max 1 of 255 per pixel. Inductor fuses and reorders float32 arithmetic (measured: the tiny
# UNet's output differs from eager by at most 3.2e-6), which after a few steps and the decoder can move a pixel across
# a rounding boundary, but no further.
INDUCTOR_PIXEL_TOLERANCE = 1


@pytest.mark.slow
@pytest.mark.parametrize("job", ["txt2img", "img2img", "hires"])
def test_inductor_compiled_generation_equals_eager_within_one_level(job):
    from PIL import Image
    overrides = {"txt2img": {},
                 "img2img": {"init_images": [Image.fromarray(INIT)], "denoising_strength": 0.6},
                 "hires": {"enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 2,
                           "hr_denoising_strength": 0.6}}[job]
    torch._dynamo.reset()
    model = random_tiny()
    eager, compiled = run(model, **overrides), run(model, compile=True, **overrides)
    assert np.abs(pixels(compiled) - pixels(eager)).max() <= INDUCTOR_PIXEL_TOLERANCE


# On CUDA (mode auto = "reduce-overhead": inductor plus CUDA graphs), fp32. Inductor's fused kernels reorder float32
# sums as on the CPU; the bound is the CPU test's plus one level, since the GPU's reductions also differ between runs
# of eager code. The measured maximum is printed with any failure.
CUDA_PIXEL_TOLERANCE = 2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("job", ["txt2img", "img2img", "hires"])
def test_cuda_graph_compiled_generation_equals_eager(job):
    from PIL import Image
    overrides = {"txt2img": {"batch_size": 2},
                 "img2img": {"init_images": [Image.fromarray(INIT)], "denoising_strength": 0.6},
                 "hires": {"enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 2,
                           "hr_denoising_strength": 0.6}}[job]
    torch._dynamo.reset()
    model = random_tiny()
    model.model.to("cuda")
    eager = run(model, **overrides)
    compiled = run(model, compile=True, **overrides)
    again = run(model, compile=True, **overrides)  # replayed graphs: outputs copied out, not overwritten
    difference = max(np.abs(pixels(compiled) - pixels(eager)).max(), np.abs(pixels(again) - pixels(eager)).max())
    assert difference <= CUDA_PIXEL_TOLERANCE, f"{job}: compiled differs from eager by {difference} levels"


def test_a_lora_job_reuses_the_compiled_unet(monkeypatch, tmp_path):
    """A caller running generate() under torch.inference_mode (benchmarks, notebooks): the LoRA's merged weights must
    stay ordinary tensors, or their changed dispatch keys fail torch.compile's guards and every compiled function
    recompiles (once per shape) at the first job with a LoRA."""
    graphs = []
    real_compile = torch.compile

    def counting(function, mode=None, dynamic=None):
        def backend(graph_module, example_inputs):
            graphs.append(graph_module)
            return graph_module.forward
        return real_compile(function, backend=backend, dynamic=dynamic, fullgraph=True)

    monkeypatch.setattr(torch, "compile", counting)
    torch._dynamo.reset()
    model = random_tiny()
    write_random_lora(tmp_path / "shift.safetensors", model.model)
    try:
        with torch.inference_mode():
            plain = run(model, compile=True)
            assert len(graphs) == 2  # the UNet and the VAE decoder
            with_lora = generate(model, GenerationParams(**{**BASE, "prompt": "a red circle <lora:shift:1>"}),
                                 progress=False, compile=True, lora_dir=tmp_path)
            assert len(graphs) == 2, "the LoRA job recompiled"
            eager_lora = generate(model, GenerationParams(**{**BASE, "prompt": "a red circle <lora:shift:1>"}),
                                  progress=False, lora_dir=tmp_path)
            assert np.array_equal(pixels(with_lora), pixels(eager_lora))
            assert not np.array_equal(pixels(with_lora), pixels(plain))  # the LoRA was applied
    finally:
        torch._dynamo.reset()
