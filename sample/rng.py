"""Seeds and noise as A1111 draws them, so a seed gives the same image here and there.

Every image has its own generator seeded with its seed. The first draw from it is the image's initial noise
[C, h, w]; the stochastic samplers' per-step noise continues the same generator. The noise of one image therefore
depends on its seed only, never on the batch it is in. "Variation seed" blends the noise of a second seed into it by
spherical interpolation; "Seed resize from" draws the noise at another size and pastes it centred, so a seed keeps its
composition when the image size changes.

Source "CPU" draws on the CPU (the same numbers on every machine); "GPU" draws on the model's device, as A1111's
default does (on a CPU-only machine both are the CPU).
"""
import random

import torch

RNG_SOURCES = ("CPU", "GPU")
MAX_SEED = 4294967294  # A1111 draws a random seed below this


def fixed_seed(seed: int | None) -> int:
    """-1 (or None) means a fresh random seed in [0, 4294967294); any other value is kept."""
    if seed is None or int(seed) == -1:
        return random.SystemRandom().randrange(MAX_SEED)
    return int(seed)


def slerp(t: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's variation-seed blend of two noise tensors [C, H, W]: t = 0 gives `low`, t = 1 gives `high`.

    Spherical interpolation (Shoemake 1985) along dim 1, i.e. each column (c, :, w) is treated as one vector, exactly
    as A1111 computes it (its norms are taken over dim 1 of the per-image [C, H, W] tensor). Where the vectors are
    almost parallel (mean cosine > 0.9995) it falls back to A1111's linear blend, which weights low by t.
    """
    low_unit = low / low.norm(dim=1, keepdim=True)
    high_unit = high / high.norm(dim=1, keepdim=True)
    cosine = (low_unit * high_unit).sum(1)  # [C, W]
    if cosine.mean() > 0.9995:
        return low * t + high * (1 - t)
    omega = torch.acos(cosine)
    sin_omega = torch.sin(omega)
    return ((torch.sin((1.0 - t) * omega) / sin_omega).unsqueeze(1) * low
            + (torch.sin(t * omega) / sin_omega).unsqueeze(1) * high)


class ImageNoise:
    """The noise of a batch of images, one generator per image (A1111's ImageRNG).

    shape: per-image latent shape (C, h, w); seeds / subseeds: one per image; subseed_strength in [0, 1];
    seed_resize_from: (height, width) in latent pixels of the size the seed's noise was originally drawn at, or None;
    device: where the noise goes; source: "CPU" or "GPU" (see the module docstring).
    `first()` is the initial noise [B, C, h, w]; every later `next()` continues the image generators.
    """

    def __init__(self, shape: tuple[int, int, int], seeds: list[int], subseeds: list[int] | None = None,
                 subseed_strength: float = 0.0, seed_resize_from: tuple[int, int] | None = None,
                 device: torch.device | str = "cpu", source: str = "CPU"):
        if source not in RNG_SOURCES:
            raise ValueError(f"unknown RNG source {source!r}; choose one of {', '.join(RNG_SOURCES)}")
        self.shape = tuple(int(s) for s in shape)
        self.seeds = list(seeds)
        self.subseeds = list(subseeds) if subseeds is not None else None
        self.subseed_strength = subseed_strength
        self.seed_resize_from = seed_resize_from
        self.device = torch.device(device)
        self.generator_device = torch.device("cpu") if source == "CPU" else self.device
        self.generators = [self._generator(seed) for seed in self.seeds]
        self.started = False

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(self.generator_device).manual_seed(int(seed))

    def _randn(self, shape, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=self.generator_device)

    def first(self) -> torch.Tensor:
        """Initial noise [B, C, h, w] (float32 on `device`)."""
        self.started = True
        resized = self.seed_resize_from is not None and tuple(self.seed_resize_from) != self.shape[1:]
        noise_shape = (self.shape[0], *self.seed_resize_from) if resized else self.shape
        images = []
        for index, (seed, generator) in enumerate(zip(self.seeds, self.generators)):
            if resized:
                noise = self._randn(noise_shape, self._generator(seed))
            else:
                noise = self._randn(self.shape, generator)
            if self.subseeds is not None and self.subseed_strength:
                subseed = self.subseeds[index] if index < len(self.subseeds) else 0
                noise = slerp(self.subseed_strength, noise, self._randn(noise_shape, self._generator(subseed)))
            if resized:
                noise = self._paste_centred(noise, self._randn(self.shape, generator))
            images.append(noise)
        return torch.stack(images).to(self.device)

    def _paste_centred(self, small: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor:
        """Put `small` [C, h0, w0] in the middle of `canvas` [C, h, w], cropping its middle part if it is larger.

        When `small` is larger by an odd number of pixels, one row/column fewer than fits is copied (A1111's
        arithmetic: 2 * floor(difference / 2) is cut off), so seeds resized here match A1111's exactly.
        """
        (_, h0, w0), (_, h, w) = small.shape, canvas.shape
        dy, dx = (h - h0) // 2, (w - w0) // 2
        rows = h0 if dy >= 0 else h0 + 2 * dy
        cols = w0 if dx >= 0 else w0 + 2 * dx
        top, left = max(dy, 0), max(dx, 0)
        src_top, src_left = max(-dy, 0), max(-dx, 0)
        canvas[:, top:top + rows, left:left + cols] = small[:, src_top:src_top + rows, src_left:src_left + cols]
        return canvas

    def next(self) -> torch.Tensor:
        """The next draw [B, C, h, w] of every image's generator (the first call is `first()`)."""
        if not self.started:
            return self.first()
        return torch.stack([self._randn(self.shape, g) for g in self.generators]).to(self.device)

    def noise_sampler(self, like: torch.Tensor):
        """A samplers-package noise sampler (sigma, sigma_next) -> noise shaped like `like`, from these generators."""
        return lambda sigma, sigma_next: self.next().to(dtype=like.dtype, device=like.device)
