"""A real uvicorn server on 127.0.0.1 (a free port) in a thread, for the web UI tests; stopped by the test that
started it. Models are tiny random ones, saved as .safetensors so the registry hashes real files."""
import os
import socket
import threading
import time

import torch
from safetensors.torch import save_file

from oracles import import_oracle

import_oracle("fastapi")  # the web UI extra: a skip without it, a failure in CI
import uvicorn  # noqa: E402  (after the skip: it comes with the same extra)

import ldm  # noqa: E402
from sample.models import default_model  # noqa: E402
from sample.params import DEFAULT_MAX_WORK  # noqa: E402
from sample.webui.app import create_app  # noqa: E402
from sample.webui.registry import Registry  # noqa: E402
from sample.webui.service import WebUIService  # noqa: E402


def tiny_model(seed: int):
    """The tiny preset with weights drawn from `seed` (the same seed gives the same weights)."""
    torch.manual_seed(seed)
    return ldm.create_model("tiny")


def write_models(models_dir: str) -> dict[str, str]:
    """Two tiny checkpoints with different weights, and a VAE file in A1111's VAE folder that fits the default model
    (bare encoder.* / decoder.* keys: its autoencoder with every weight perturbed):
    {"a": path, "b": path, "vae": path}."""
    os.makedirs(os.path.join(models_dir, "VAE"), exist_ok=True)
    paths = {"a": os.path.join(models_dir, "tiny-a.safetensors"), "b": os.path.join(models_dir, "tiny-b.safetensors"),
             "vae": os.path.join(models_dir, "VAE", "other.vae.safetensors")}
    ldm.save_model(tiny_model(1), paths["a"])
    ldm.save_model(tiny_model(2), paths["b"])
    generator = torch.Generator().manual_seed(3)
    vae = default_model().model.first_stage_model.state_dict()
    save_file({k: (v + 0.05 * torch.randn(v.shape, generator=generator)).contiguous() for k, v in vae.items()},
              paths["vae"])
    return paths


class RunningServer:
    """create_app(service) served by uvicorn in a background thread; `url` is its base address."""

    def __init__(self, service: WebUIService, credentials: dict[str, str] | None = None,
                 cmd_flags: dict | None = None):
        self.service = service
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))  # port 0: the kernel picks a free one, no race with other tests
        self.port = listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(service, credentials, cmd_flags), log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [listener]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        service.ready.result(timeout=60)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.service.close()  # idempotent after the app's shutdown closed it


def start_server(tmp_path, credentials=None, embeddings_dir=None, max_work=DEFAULT_MAX_WORK, styles_file=None,
                 cmd_flags=None, controlnet_dir=None, dtype=None, **registry_options) -> RunningServer:
    """A server with the project's default model (sample.models.default_model) built in, writing its images under
    tmp_path/outputs."""
    registry = Registry(**registry_options)
    service = WebUIService(registry, outdir=str(tmp_path / "outputs"), load_default=default_model,
                           embeddings_dir=embeddings_dir, device="cpu", max_work=max_work, styles_file=styles_file,
                           controlnet_dir=controlnet_dir, dtype=dtype)
    return RunningServer(service, credentials, cmd_flags)
