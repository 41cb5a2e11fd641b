"""The web UI's parts without HTTP: the job queue, the model registry, request translation, live previews."""
import base64
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from oracles import import_oracle

import_oracle("fastapi")  # the web UI extra: a skip without it, a failure in CI

import ldm  # noqa: E402
from sample.webui.app import parse_credentials  # noqa: E402
from sample.webui.preview import ImageDecodeError, decode_image, encode_png, fit_latent_to_rgb  # noqa: E402
from sample.webui.registry import NotFound, Registry  # noqa: E402
from sample.params import MAX_STEPS  # noqa: E402
from sample.webui.schemas import (Img2ImgRequest, RequestError, Txt2ImgRequest, resolve_sampler_name,  # noqa: E402
                                  resolve_scheduler)
from sample import Interrupted, Skipped  # noqa: E402
from sample.webui.worker import Worker  # noqa: E402


@pytest.fixture
def worker():
    worker = Worker()
    yield worker
    worker.stop()


def test_jobs_run_one_at_a_time_in_order_of_arrival(worker):
    running, overlaps, order = [], [], []

    def job(number):
        def run(control):
            running.append(number)
            overlaps.append(len(running))
            time.sleep(0.02)
            order.append(number)
            running.remove(number)
            return number * 10
        return run

    jobs = [worker.submit(job(i)) for i in range(6)]
    assert [j.future.result(timeout=10) for j in jobs] == [0, 10, 20, 30, 40, 50]
    assert order == list(range(6))
    assert max(overlaps) == 1


def test_a_job_is_finished_and_the_worker_idle_once_its_answer_is_given(worker):
    """What a client sees once it has its answer: its task completed and no job running, so a /progress right after
    the response never shows it. Checked the moment the answer is given (a done-callback runs then, in the worker's
    thread), for a result and for an error."""
    def failing(control):
        raise ValueError("bad request")

    release, seen = threading.Event(), []
    jobs = [worker.submit(lambda control: release.wait(10), "task(ok)"), worker.submit(failing, "task(bad)")]
    for job in jobs:
        job.future.add_done_callback(
            lambda future, task=job.task_id: seen.append((worker.position(task), worker.control)))
    release.set()
    assert jobs[0].future.result(timeout=10) is True
    with pytest.raises(ValueError):
        jobs[1].future.result(timeout=10)
    assert seen == [(("finished", 0), None), (("finished", 0), None)]


def _batches(control, batches=3, steps=200, finished=None):
    """A job of `batches` batches of `steps` steps that records which batches completed."""
    for batch in range(batches):
        control.begin_batch(batch, batches, steps)
        try:
            for step in range(1, steps + 1):
                time.sleep(0.001)
                control.report(step / steps)
                control.check()
        except Skipped:
            continue
        except Interrupted:
            return finished
        finished.append(batch)
    return finished


def test_interrupt_stops_the_running_job_and_not_the_queued_one(worker):
    first = worker.submit(lambda control: _batches(control, finished=[]))
    second = worker.submit(lambda control: _batches(control, batches=1, steps=5, finished=[]))
    while worker.control is None or worker.control.sampling_step < 3:
        time.sleep(0.001)
    assert worker.position(second.task_id) == ("queued", 1)
    worker.interrupt()
    assert first.future.result(timeout=10) == []  # stopped inside its first batch
    assert second.future.result(timeout=10) == [0]  # ran to the end afterwards


def test_interrupt_by_task_id_stops_that_task_running_queued_or_not_yet_submitted(worker):
    first = worker.submit(lambda control: _batches(control, finished=[]), "task(first)")
    second = worker.submit(lambda control: _batches(control, batches=1, steps=5, finished=[]), "task(second)")
    while worker.control is None or worker.control.sampling_step < 3:
        time.sleep(0.001)
    worker.interrupt("task(second)")  # queued: the running job goes on, the queued one stops at its first check
    worker.interrupt("task(early)")  # its request has not reached the queue yet
    early = worker.submit(lambda control: _batches(control, batches=1, steps=5, finished=[]), "task(early)")
    later = worker.submit(lambda control: _batches(control, batches=1, steps=5, finished=[]), "task(later)")
    assert worker.control.job.task_id == "task(first)" and not worker.control.interrupted
    worker.interrupt("task(first)")
    assert first.future.result(timeout=10) == []
    assert second.future.result(timeout=10) == [] and early.future.result(timeout=10) == []
    assert later.future.result(timeout=10) == [0]  # untouched
    worker.interrupt("task(later)")  # finished: nothing is kept for it
    assert not worker.submit(lambda control: control.interrupted, "task(later)").future.result(timeout=10)


def test_skip_abandons_the_current_batch_only(worker):
    job = worker.submit(lambda control: _batches(control, finished=[]))
    while worker.control is None or worker.control.sampling_step < 3:
        time.sleep(0.001)
    worker.skip()
    assert job.future.result(timeout=20) == [1, 2]


def test_a_failing_job_reports_its_error_and_the_worker_goes_on(worker):
    def fail(control):
        raise ValueError("bad job")

    failed = worker.submit(fail)
    after = worker.submit(lambda control: "ok")
    with pytest.raises(ValueError, match="bad job"):
        failed.future.result(timeout=10)
    assert after.future.result(timeout=10) == "ok"
    assert worker.position(failed.task_id) == ("finished", 0)


def test_progress_fraction_counts_batches_and_steps(worker):
    seen = []
    release = threading.Event()

    def run(control):
        control.begin_batch(1, 4, 10)
        control.report(0.5)
        seen.append(control.fraction)
        release.wait(5)

    job = worker.submit(run)
    while not seen:
        time.sleep(0.001)
    assert seen == [pytest.approx((1 + 0.5) / 4)]
    assert worker.control.sampling_step == 5
    release.set()
    job.future.result(timeout=5)


# ----- registry ---------------------------------------------------------------------------------------------------

def _touch(path, content: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def test_registry_lists_checkpoints_with_a1111_titles_and_hashes(tmp_path):
    a = _touch(tmp_path / "models" / "a.safetensors", b"first model")
    b = _touch(tmp_path / "models" / "sub" / "b.ckpt", b"second model")
    _touch(tmp_path / "models" / "VAE" / "v.safetensors", b"a vae")
    _touch(tmp_path / "models" / "x.vae.safetensors", b"another vae")
    _touch(tmp_path / "models" / "notes.txt", b"not a model")
    registry = Registry(models_dir=str(tmp_path / "models"))

    titles = [c.title for c in registry.checkpoints]
    assert titles == ["default", f"a.safetensors [{ldm.model_hash(a)}]", f"sub/b.ckpt [{ldm.model_hash(b)}]"]
    assert sorted(v.name for v in registry.vaes) == ["v.safetensors", "x.vae.safetensors"]
    entry = registry.checkpoint("sub_b")  # A1111's model_name
    assert entry.filename == str(b) and len(entry.sha256) == 64
    for alias in (entry.title, "sub/b.ckpt", "sub/b", entry.sha256, ldm.model_hash(b)):
        assert registry.checkpoint(alias) == entry
    assert registry.default.filename is None  # no --model: the built-in default model


def test_registry_names_never_resolve_outside_its_listing(tmp_path):
    _touch(tmp_path / "secret.safetensors", b"outside")
    _touch(tmp_path / "models" / "a.safetensors", b"inside")
    registry = Registry(models_dir=str(tmp_path / "models"))
    for name in ("../secret.safetensors", "../secret", str(tmp_path / "secret.safetensors")):
        with pytest.raises(NotFound, match="available: default, a.safetensors"):
            registry.checkpoint(name)
    with pytest.raises(NotFound, match="VAE '../x' not found"):
        registry.vae("../x")


def test_refresh_finds_new_files_and_model_path_becomes_the_default(tmp_path):
    outside = _touch(tmp_path / "mine.safetensors", b"given with --model")
    registry = Registry(models_dir=str(tmp_path / "models"), model_path=str(outside))
    assert [c.name for c in registry.checkpoints] == ["mine.safetensors"]
    assert registry.default.filename == str(outside)
    _touch(tmp_path / "models" / "new.ckpt", b"added later")
    registry.refresh()
    assert [c.name for c in registry.checkpoints] == ["mine.safetensors", "new.ckpt"]


# ----- request translation ----------------------------------------------------------------------------------------

def test_requests_take_a1111_defaults_and_names():
    fields = Txt2ImgRequest().generation_fields()
    assert (fields["steps"], fields["width"], fields["height"], fields["sampler_name"], fields["cfg_scale"]) == \
        (50, None, None, "Euler", 7.0)  # A1111's API defaults (its sampler_index is "Euler"), but no size: the
    # model's native resolution, where A1111 makes 512x512 whatever the model (issue 18)
    assert fields["seed_resize_from_w"] == 0  # A1111's -1 "off" is GenerationParams' 0
    assert resolve_scheduler("karras") == "Karras" and resolve_scheduler("align_your_steps") == "Align Your Steps"
    assert resolve_scheduler(None) == "Automatic"
    assert resolve_sampler_name("k_euler_a") == "Euler a" and resolve_sampler_name("dpm++ 2m") == "DPM++ 2M"
    hires = Txt2ImgRequest(enable_hr=True, width=64, height=96, hr_resize_y=144, denoising_strength=0.4)
    fields = hires.generation_fields()
    assert (fields["hr_scale"], fields["hr_upscaler"], fields["hr_denoising_strength"]) == (1.5, "Latent", 0.4)
    img2img = Img2ImgRequest(init_images=["x"], mask_blur_x=3, mask_blur_y=3).generation_fields()
    assert (img2img["mask_blur"], img2img["inpaint_full_res"], img2img["inpainting_fill"]) == (3, True, 0)


@pytest.mark.parametrize("body, message", [
    ({"width": 100}, "width must be a positive multiple of 8"),
    ({"steps": 0}, f"steps must be between 1 and {MAX_STEPS}"),
    ({"steps": MAX_STEPS + 1}, f"steps must be between 1 and {MAX_STEPS}"),
    ({"scheduler": "warp"}, "unknown scheduler 'warp'"),
    ({"alwayson_scripts": {"Regional Prompter": {"args": [True]}}}, "Regional Prompter: not available on this server"),
    ({"enable_hr": True, "hr_sampler_name": "DDIM"}, "hr_sampler_name='DDIM'"),
    ({"enable_hr": True, "width": 512, "height": 512, "hr_resize_x": 1024, "hr_resize_y": 600},
     "change the aspect ratio"),
    ({"enable_hr": True, "hr_resize_x": 1024}, "need the first pass's width and height"),
])
def test_bad_requests_are_refused_with_the_field_named(body, message):
    with pytest.raises(RequestError, match=message):
        Txt2ImgRequest(**body).generation_fields()


def test_img2img_needs_an_image_and_equal_mask_blurs():
    with pytest.raises(RequestError, match="init_images is empty"):
        Img2ImgRequest().generation_fields()
    with pytest.raises(RequestError, match="mask_blur_x=2 and mask_blur_y=5 differ"):
        Img2ImgRequest(init_images=["x"], mask_blur_x=2, mask_blur_y=5).generation_fields()


def test_api_auth_accepts_several_users_and_refuses_malformed_pairs():
    assert parse_credentials("alice:s3cret,bob:pa:ss") == {"alice": "s3cret", "bob": "pa:ss"}
    with pytest.raises(ValueError, match="user:password"):
        parse_credentials("alice")


# ----- images and previews ----------------------------------------------------------------------------------------

def test_png_round_trip_keeps_pixels_and_infotext():
    image = Image.new("RGB", (16, 8), (10, 200, 30))
    data = encode_png(image, "a cat\nSteps: 20, Sampler: Euler a, Seed: 1")
    for form in (data, "data:image/png;base64," + data):
        decoded = decode_image(form)
        assert decoded.tobytes() == image.tobytes()
        assert decoded.info["parameters"] == "a cat\nSteps: 20, Sampler: Euler a, Seed: 1"
    for bad in ("", "not base64!", base64.b64encode(b"not an image").decode()):
        with pytest.raises(ImageDecodeError):
            decode_image(bad)


class _LinearLatentModel:
    """A stand-in whose 'VAE' is known: latent = A · (2×2 average colour) + b, per latent pixel."""
    device, dtype, scale_factor = torch.device("cpu"), torch.float32, 0.5

    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.A = torch.randn(4, 3, generator=generator)
        self.b = torch.randn(4, generator=generator)
        model = self

        class Posterior:
            def __init__(self, mean):
                self.mean = mean

        class Encoder:
            def encode(self, images):
                colours = F.avg_pool2d(images, 2)
                return Posterior((torch.einsum("cd,bdhw->bchw", model.A, colours) + model.b[:, None, None])
                                 / model.scale_factor)

        self.first_stage_model = Encoder()


def test_fitted_preview_map_inverts_a_linear_latent_space():
    model = _LinearLatentModel()
    mapping = fit_latent_to_rgb(model)
    colours = torch.rand(1, 3, 8, 8) * 2 - 1  # an image the fit has not seen, one colour per latent pixel
    latent = torch.einsum("cd,bdhw->bchw", model.A, colours) + model.b[:, None, None]
    z = latent[0].permute(1, 2, 0).reshape(-1, 4)
    recovered = torch.cat([z, torch.ones(len(z), 1)], 1) @ mapping
    torch.testing.assert_close(recovered, colours[0].permute(1, 2, 0).reshape(-1, 3), atol=1e-4, rtol=0)


# ----- command line -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--model", "/nonexistent/model.safetensors"], "--model: file not found: /nonexistent/model.safetensors"),
    (["--models-dir", "/nonexistent"], "--models-dir: folder not found: /nonexistent"),
    (["--port", "70000"], "--port must be 1..65535, got 70000"),
    (["--steps", "3"], "unrecognized arguments: --steps 3"),
    (["--extension", "/nonexistent/samplers.py"], "--extension: file not found: /nonexistent/samplers.py"),
    (["--extension", "no_such_package.samplers"], "--extension: no module named 'no_such_package.samplers' (give a "
                                                  ".py file or an importable module)"),
])
def test_command_line_mistakes_exit_2_with_one_clear_line(argv, message, capsys):
    from sample.webui.__main__ import main
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].endswith(message) and "Traceback" not in "".join(error)


# ----- the step monitor -------------------------------------------------------------------------------------------

def _monitored_run(control, **overrides):
    from sample import GenerationParams, generate
    from sample.models import default_model
    from sample.webui.monitor import StepMonitor

    params = GenerationParams(**{"prompt": "a red circle", "seed": 3, "steps": 3, "sampler_name": "Euler",
                                 **overrides})
    seen = []
    monitor = StepMonitor(control, params)

    def callback(step):
        seen.append(step)
        monitor(step)

    result = generate(default_model(), params, progress=False, callback=callback, interrupt_check=monitor.check)
    return result, seen


@pytest.mark.parametrize("overrides", [{}, {"enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 2}])
def test_monitor_counts_generates_steps_and_previews_the_samplers_denoised_estimate(overrides):
    from sample import GenerationParams, batch_steps
    from sample.webui.worker import Job, JobControl

    control = JobControl(Job(lambda c: None, "task(test)"))
    total = batch_steps(GenerationParams(steps=3, **overrides))
    control.begin_batch(0, 1, total)
    result, seen = _monitored_run(control, **overrides)
    assert len(seen) == total and control.sampling_step == total and control.fraction == 1.0
    assert torch.equal(control.latent, seen[-1].denoised[0])  # the preview is the last step's x0, first image
    assert len(result.images) == 1 and not result.interrupted


def test_monitor_interrupts_and_stops_the_job_between_unet_layers():
    from sample.webui.worker import Job, JobControl, ServerStopping

    control = JobControl(Job(lambda c: None, "task(test)"))
    control.begin_batch(0, 1, 3)
    control.interrupted = True
    result, seen = _monitored_run(control)
    assert result.interrupted and result.images == [] and seen == []  # stopped inside the first step
    control.stopping = True
    with pytest.raises(ServerStopping, match="shutting down"):
        _monitored_run(control)


def test_stopping_the_worker_fails_the_running_and_the_queued_jobs(worker):
    from sample.webui.worker import ServerStopping

    running = worker.submit(lambda control: _batches(control, batches=1, steps=100000, finished=[]))
    queued = worker.submit(lambda control: "never")
    while worker.control is None:
        time.sleep(0.001)
    started = time.monotonic()
    worker.stop()
    assert time.monotonic() - started < 5
    for job in (running, queued):
        with pytest.raises(ServerStopping):
            job.future.result(timeout=5)


def test_compile_setting_takes_off_auto_or_a_torch_compile_mode_and_says_which():
    from sample.webui.service import DEFAULT_OPTIONS, _check_setting
    assert DEFAULT_OPTIONS["ldm_compile"] == "off"
    for value in ("off", "auto", "reduce-overhead"):
        assert _check_setting("ldm_compile", value, registry=None) == value
    with pytest.raises(RequestError, match="ldm_compile must be one of off, auto, default, reduce-overhead"):
        _check_setting("ldm_compile", True, registry=None)
