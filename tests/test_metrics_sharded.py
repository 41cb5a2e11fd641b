"""`metrics.evaluate` under torchrun: 2 gloo CPU processes share out the Inception passes batch by batch, and rank 0
prints exactly the numbers of one process."""
import contextlib
import io
import json
import os
import socket

import numpy as np
import torch.multiprocessing as mp

import metrics.evaluate as evaluate
from test_metrics_evaluate import SIZE, PixelFeatures, write_png


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world_size: int, port: int, argv: list[str], out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    evaluate.load_inception = lambda path: PixelFeatures()  # the stand-in Inception of test_metrics_evaluate
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = evaluate.main(argv)
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"status": status, "stdout": stdout.getvalue()}, f)


def test_two_processes_give_the_one_process_numbers(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(1)
    for folder in ("real", "fake"):
        (tmp_path / folder).mkdir()
        for i in range(5):  # batches of 2: ranks 0 and 1 get 2 and 1 batches, the last one short
            write_png(tmp_path / folder / f"{i:03d}.png", (rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8))
    (tmp_path / "weights.pth").write_bytes(b"stand-in")
    argv = ["--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"), "--metrics", "fid,kid,is",
            "--inception-weights", str(tmp_path / "weights.pth"), "--batch-size", "2", "--kid-subsets", "3",
            "--kid-subset-size", "4", "--is-splits", "2", "--device", "cpu", "--report", ""]
    monkeypatch.setattr(evaluate, "load_inception", lambda path: PixelFeatures())
    assert evaluate.main(argv) == 0
    numbers = json.loads(capsys.readouterr().out)
    mp.spawn(_rank, args=(2, _free_port(), argv, str(tmp_path / "two")), nprocs=2)
    two, quiet = (json.loads((tmp_path / name).read_text()) for name in ("two.0", "two.1"))
    assert two["status"] == quiet["status"] == 0
    assert set(numbers["metrics"]) == {"fd_inception_unofficial", "kid_unofficial_mean", "kid_unofficial_std",
                                       "is_unofficial_mean", "is_unofficial_std"}
    assert json.loads(two["stdout"]) == numbers  # bitwise: every image went through the same batch
    assert quiet["stdout"] == ""  # rank 1 leaves the report to rank 0
