"""Train a tiny Real-ESRGAN RRDBNet (sample.upscalers.esrgan.RRDBNet, x4) on the shapes world and compare it with
Lanczos: does the architecture learn, not just load?

Pairs are the same scene rendered by `shapes.render` at 64×64 (input) and 256×256 (target); the score is the PSNR of
the x4 output of held-out 64×64 renders against their 256×256 renders, next to PIL's Lanczos x4 of the same inputs.

    python examples/train_upscaler.py --steps 300 --out tiny-rrdbnet-x4.safetensors

The saved file has Real-ESRGAN's keys, so `--upscalers-dir` lists it and the Extras tab and hires fix can use it.
"""
import argparse
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.checkpoint import save_state_dict
from sample.upscalers.esrgan import RRDBNet
from shapes.dataset import sample
from shapes.world import Vocabulary, render

LOW, HIGH = 64, 256  # x4


def render_pairs(first: int, count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """([count, 3, 64, 64], [count, 3, 256, 256]) in [0, 1]: scenes first..first+count-1 of the shapes data set."""
    low, high = [], []
    for index in range(first, first + count):
        scene, _ = sample(seed, index, Vocabulary())
        low.append(np.asarray(render(scene, LOW, LOW)))
        high.append(np.asarray(render(scene, HIGH, HIGH)))
    as_tensor = lambda images: torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255  # noqa: E731
    return as_tensor(low), as_tensor(high)


def psnr(output: torch.Tensor, target: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB for images in [0, 1], over the whole batch."""
    return float(10 * torch.log10(1 / F.mse_loss(output, target)))


def lanczos_x4(low: torch.Tensor) -> torch.Tensor:
    """PIL's Lanczos x4 of each image, through 8-bit images as an upscaler would see them."""
    images = [Image.fromarray((x.permute(1, 2, 0) * 255).round().byte().numpy()) for x in low]
    return torch.stack([torch.from_numpy(np.array(image.resize((image.width * 4, image.height * 4), Image.LANCZOS)))
                        for image in images]).permute(0, 3, 1, 2).float() / 255


def start_as_bilinear_upscaler(model: RRDBNet) -> None:
    """Initialise the convs outside the trunk so that the untrained network is bilinear x4 and training learns the
    correction to it (ESRGAN scales its residual blocks' initialisation down for the same reason; the trunk's output
    conv is scaled by 0.1 here).

    conv_first keeps the image as 1 - x in its first 3 channels (so the white background is 0 and the convs' zero
    padding continues the background at the image borders), conv_up1 and conv_up2 follow their nearest x2 with the
    [1, 2, 1]/4 tent in each direction (nearest x2 then the tent is bilinear x2), conv_hr passes its input on, and
    conv_last maps 1 - x back. The LeakyReLUs pass the non-negative features unchanged."""
    tent = torch.tensor([1.0, 2.0, 1.0]) / 4
    with torch.no_grad():
        for conv in (model.conv_first, model.conv_hr, model.conv_last):
            torch.nn.init.dirac_(conv.weight)
            conv.bias.zero_()
        for conv in (model.conv_up1, model.conv_up2):
            conv.weight.zero_()
            conv.bias.zero_()
            for channel in range(conv.weight.shape[0]):
                conv.weight[channel, channel] = torch.outer(tent, tent)
        model.conv_first.weight.neg_()
        model.conv_first.bias[:3] = 1
        model.conv_last.weight.neg_()
        model.conv_last.bias[:] = 1
        model.conv_body.weight.mul_(0.1)
        model.conv_body.bias.zero_()


def train(steps: int, features: int = 16, growth: int = 16, blocks: int = 1, batch: int = 8, patch: int = 24,
          learning_rate: float = 5e-4, train_images: int = 256, seed: int = 0, log=print) -> tuple[RRDBNet, dict]:
    """Trains on random patch x patch crops of the 64×64 renders (and the matching 4·patch crops of the targets)
    with MSE and Adam under a one-cycle schedule. Returns (model, PSNRs in dB on 16 held-out scenes: "nearest",
    "lanczos", "untrained" (the bilinear start) and "trained")."""
    torch.manual_seed(seed)
    train_low, train_high = render_pairs(0, train_images, seed)
    test_low, test_high = render_pairs(100_000, 16, seed)  # scenes the training never sees
    model = RRDBNet(3, 3, features=features, growth=growth, blocks=blocks, unshuffle=1)
    start_as_bilinear_upscaler(model)
    with torch.no_grad():
        untrained = psnr(model(test_low).clamp(0, 1), test_high)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed + 1)
    started = time.monotonic()
    for step in range(steps):
        picks = torch.randint(0, train_images, (batch,), generator=generator)
        tops, lefts = torch.randint(0, LOW - patch + 1, (2, batch), generator=generator)
        low = torch.stack([train_low[i, :, t:t + patch, l:l + patch] for i, t, l in zip(picks, tops, lefts)])
        high = torch.stack([train_high[i, :, 4 * t:4 * (t + patch), 4 * l:4 * (l + patch)]
                            for i, t, l in zip(picks, tops, lefts)])
        loss = F.mse_loss(model(low), high)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % 100 == 0:
            log(f"step {step + 1}/{steps}: loss {loss.item():.5f} ({time.monotonic() - started:.0f} s)")
    model.eval()
    with torch.no_grad():
        scores = {"nearest": psnr(F.interpolate(test_low, scale_factor=4, mode="nearest"), test_high),
                  "lanczos": psnr(lanczos_x4(test_low), test_high),
                  "untrained": untrained, "trained": psnr(model(test_low).clamp(0, 1), test_high)}
    return model, scores


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--out", help="save the trained model here (.safetensors, Real-ESRGAN keys)")
    args = parser.parse_args(argv)
    model, scores = train(args.steps, log=lambda text: print(text, file=sys.stderr))
    print(" ".join(f"{name} {value:.2f} dB" for name, value in scores.items()))
    if args.out:
        save_state_dict(model.state_dict(), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
