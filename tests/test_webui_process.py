"""`python -m sample.webui` as a real process: an --extension's sampler is offered by the API and the page and
generates; SIGTERM during a long job ends the server within seconds, the job in flight and the queued one answered
503 (uvicorn alone would wait for the generation to finish)."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from oracles import import_oracle

httpx = import_oracle("httpx")
import_oracle("fastapi")  # the web UI extra: a skip without it, a failure in CI

from sample.infotext import parse_infotext  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXTENSION = '''
from samplers import register_sampler
from samplers.sampling import sample_euler

register_sampler("Extension Euler", sample_euler, schedule="Karras", aliases=("ext_euler",))
'''
TXT2IMG = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "cfg_scale": 3, "seed": 7}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    extension = tmp_path / "my_samplers.py"
    extension.write_text(EXTENSION)
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "sample.webui", "--port", str(port), "--outdir", str(tmp_path / "outputs"),
         "--extension", str(extension)],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, process.stdout.read().decode()
        try:
            httpx.get(url + "/sdapi/v1/options", timeout=5)
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
    yield process, url
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)


def test_extension_sampler_is_listed_and_generates_then_sigterm_answers_503_within_seconds(server):
    process, url = server
    with httpx.Client(base_url=url, timeout=120) as client:
        listed = {entry["name"]: entry["aliases"] for entry in client.get("/sdapi/v1/samplers").json()}
        assert listed["Extension Euler"] == ["ext_euler"]
        assert "Extension Euler" in client.get("/internal/config").json()["samplers"]  # the page's list
        response = client.post("/sdapi/v1/txt2img", json=dict(TXT2IMG, sampler_name="ext_euler"))
        assert response.status_code == 200, response.text
        infotext = json.loads(response.json()["info"])["infotexts"][0]
        assert parse_infotext(infotext)["Sampler"] == "Extension Euler"

        answers = {}

        def post(name, body):
            with httpx.Client(base_url=url, timeout=120) as own:
                answers[name] = own.post("/sdapi/v1/txt2img", json=body)

        long_job = threading.Thread(target=post, args=("running", dict(TXT2IMG, steps=1000)))
        long_job.start()
        while client.get("/sdapi/v1/progress").json()["state"]["sampling_step"] < 2:
            time.sleep(0.02)
        queued = threading.Thread(target=post, args=("queued", TXT2IMG))
        queued.start()
        while client.get("/sdapi/v1/progress").json()["state"]["queued"] < 1:
            time.sleep(0.02)

    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    long_job.join(timeout=30)
    queued.join(timeout=30)
    process.wait(timeout=30)
    # The job had about 1000 steps to go (tens of seconds); it stopped within a UNet layer instead.
    assert time.monotonic() - signalled < 10
    for name in ("running", "queued"):
        assert answers[name].status_code == 503, (name, answers[name].text)
        assert "shutting down" in answers[name].json()["detail"]

