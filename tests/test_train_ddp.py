"""Distributed training: 2 processes on gloo (CPU) under torchrun against 1 process with the doubled batch."""
import json

import torch

from ldm.checkpoint import read_state_dict
from train_support import fast_config, pretrained_file, single_process, torchrun, write_images


def test_two_process_ddp_matches_one_process_with_the_doubled_batch(tmp_path):
    write_images(tmp_path / "images", 4, sizes=((16, 16),))
    model = pretrained_file(tmp_path / "base.safetensors")
    # Adam divides by sqrt(v): round-off-sized gradients of parameters whose true gradient is zero (biases feeding
    # a GroupNorm with one channel per group, key-projection biases under softmax) would become full lr-sized steps
    # of random sign. A large epsilon keeps updates proportional to the gradients, so this compares the gradients.
    options = dict(model=str(model), architecture={}, max_steps=3, lr=1e-2, adam_epsilon=1e-2,
                   train_text_encoder=True, min_snr_gamma=5.0, ema_decay=0.5)
    distributed = fast_config(tmp_path / "images", tmp_path / "ddp", batch_size=1, **options)
    torchrun(2, distributed, timeout=600)
    single = single_process(fast_config(tmp_path / "images", tmp_path / "one", batch_size=2, **options))
    a, b = read_state_dict(tmp_path / "ddp" / "model.safetensors"), read_state_dict(single.weights)
    assert a.keys() == b.keys()
    # Same samples and noise per global batch; only the order of float reductions differs (all-reduce vs batch).
    base = read_state_dict(model)
    moved = max((a[k] - base[k]).abs().max().item() for k in base)
    assert moved > 1e-3  # the training did change the weights
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("ddp", "one")]
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), atol=1e-6, rtol=1e-5)
    state = json.loads((tmp_path / "ddp" / "checkpoint-3" / "state.json").read_text())
    assert state["world_size"] == 2 and len(torch.load(tmp_path / "ddp" / "checkpoint-3" / "rng.pt",
                                                       weights_only=True)["ranks"]) == 2
