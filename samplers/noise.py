"""Noise sources for the stochastic samplers.

A *noise sampler* is any callable ``noise_sampler(sigma, sigma_next) -> Tensor`` returning standard normal noise shaped
like the sample ``x`` for the step that goes from noise level ``sigma`` to ``sigma_next``. Samplers never draw noise
themselves; they ask their noise sampler, so a caller can swap the source (global RNG, per-image seeds, Brownian tree)
without touching the sampler.
"""

import math

import torch


def default_noise_sampler(x, generator=None):
    """Fresh N(0, I) noise on every call, drawn from ``generator`` or, when it is None, torch's global RNG.

    x: the sample whose shape, dtype and device the noise takes.
    """
    if generator is None:
        return lambda sigma, sigma_next: torch.randn_like(x)
    return lambda sigma, sigma_next: torch.randn(
        x.shape, generator=generator, dtype=x.dtype, device=generator.device).to(x.device)


def mix_seed(seed, stream):
    """A seed for an independent random stream derived from (seed, stream), so that e.g. the sampler noise of an image
    is not a replay of its initial noise drawn with the same seed (SplitMix64 finaliser, Steele et al. 2014)."""
    mask = 2**64 - 1
    z = (int(seed) + (int(stream) + 1) * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) & (2**63 - 1)


def seeded_noise_sampler(x, generators):
    """Fresh N(0, I) noise per call where batch item ``b`` draws from its own CPU generator ``generators[b]``.

    This makes image ``b`` reproducible from its generator's seed alone, whatever the batch size or device. Passing the
    generators the initial noise was drawn from continues their streams, which is how A1111 draws sampler noise.
    x: [B, ...]; generators: B torch.Generator on the CPU.
    """
    if len(generators) != x.shape[0]:
        raise ValueError(f"seeded_noise_sampler got {len(generators)} generators for a batch of {x.shape[0]}; "
                         "pass one per image")

    def sample(sigma, sigma_next):
        noise = [torch.randn(x.shape[1:], generator=generator) for generator in generators]
        return torch.stack(noise).to(device=x.device, dtype=x.dtype)

    return sample


class BrownianTree:
    """One path of a Brownian motion W on [t_min, t_max], W(t_min) = 0, that is a pure function of (seed, t).

    Built lazily by the Lévy construction: a node is an interval [a, b] whose end values W(a), W(b) are known; its
    midpoint value is drawn from the Brownian bridge, W(m) ~ N((W(a) + W(b)) / 2, (b - a) / 4), with the node's own
    seed, and each child gets a seed derived from its parent's. A query descends from the root to a leaf of width
    (t_max - t_min) / 2**depth and interpolates linearly inside it, so every query of the same t returns the same
    value, whichever other times were asked before (this is what makes SDE samples independent of the step count).
    Only the last root-to-leaf path is kept, so memory stays at `depth` tensors.

    shape: the shape of W(t); seed: an integer; depth: number of bisection levels (2**-24 of the interval by default,
    far below any step size a sampler uses). The tree's draws are independent of torch.randn seeded with `seed`.
    """

    def __init__(self, t_min, t_max, shape, seed, depth=24):
        if not t_min < t_max:
            raise ValueError(f"BrownianTree needs t_min < t_max, got [{t_min}, {t_max}]")
        self.t_min, self.t_max, self.shape, self.depth = float(t_min), float(t_max), tuple(shape), depth
        root_generator = torch.Generator("cpu").manual_seed(mix_seed(seed, stream=1))
        w_max = torch.randn(self.shape, generator=root_generator) * math.sqrt(self.t_max - self.t_min)
        root_seed = int(torch.randint(0, 2**62, (), generator=root_generator))
        # path[k] = (a, b, W(a), W(b), seed) of the level-k node on the most recent query's path.
        self.path = [(self.t_min, self.t_max, torch.zeros(self.shape), w_max, root_seed)]

    @staticmethod
    def _split(a, b, w_a, w_b, seed):
        """Draw W at the midpoint of [a, b] from the Brownian bridge; return it and the two children's seeds."""
        generator = torch.Generator("cpu").manual_seed(seed)
        bridge_noise = torch.randn(w_a.shape, generator=generator)
        left_seed, right_seed = torch.randint(0, 2**62, (2,), generator=generator).tolist()
        w_mid = (w_a + w_b) / 2 + bridge_noise * (math.sqrt(b - a) / 2)
        return w_mid, left_seed, right_seed

    def __call__(self, t):
        """W(t): a float32 CPU tensor of `shape`."""
        t = float(t)
        # Levels given in float32 may sit an ulp outside an interval given in float64: clamp those.
        slack = 1e-6 * (self.t_max - self.t_min + abs(self.t_max))
        if self.t_min - slack <= t <= self.t_max + slack:
            t = min(max(t, self.t_min), self.t_max)
        else:
            raise ValueError(f"BrownianTree queried at t={t}, outside its interval [{self.t_min}, {self.t_max}]; "
                             "build it over the whole range of noise levels the sampler visits")
        # Reuse the deepest node of the previous path that still contains t, then descend from there.
        level = len(self.path) - 1
        while not self.path[level][0] <= t <= self.path[level][1]:
            level -= 1
        del self.path[level + 1:]
        while len(self.path) <= self.depth:
            a, b, w_a, w_b, seed = self.path[-1]
            mid = (a + b) / 2
            w_mid, left_seed, right_seed = self._split(a, b, w_a, w_b, seed)
            self.path.append((a, mid, w_a, w_mid, left_seed) if t <= mid else (mid, b, w_mid, w_b, right_seed))
        a, b, w_a, w_b = self.path[-1][:4]
        return torch.lerp(w_a, w_b, (t - a) / (b - a))


class BrownianTreeNoiseSampler:
    """Noise for SDE samplers from a fixed Brownian path: the step sigma -> sigma_next gets
    (W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|) ~ N(0, I).

    Because the path depends only on the seed, splitting a step in two draws noise that sums to the same Brownian
    increment: samples change smoothly with the step count instead of being re-rolled (as k-diffusion's sampler of
    the same name, which wraps torchsde).

    x: [B, ...] sample; sigma_min, sigma_max: the range of noise levels that will be queried; seed: an int (one path
    for the whole batch) or a list of B ints (one path per image, so image b depends on seeds[b] only) or None (a
    random seed from torch's global RNG); transform: maps sigma to the tree's time variable.
    """

    def __init__(self, x, sigma_min, sigma_max, seed=None, transform=lambda sigma: sigma):
        self.transform = transform
        self.device, self.dtype = x.device, x.dtype
        t_min, t_max = sorted((float(transform(float(sigma_min))), float(transform(float(sigma_max)))))
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        if not isinstance(seed, (list, tuple)):
            self.trees, self.batched = [BrownianTree(t_min, t_max, x.shape, int(seed))], False
        else:
            if len(seed) != x.shape[0]:
                raise ValueError(f"BrownianTreeNoiseSampler got {len(seed)} seeds for a batch of {x.shape[0]}")
            self.trees, self.batched = [BrownianTree(t_min, t_max, x.shape[1:], s) for s in seed], True
        # The end of one step is the start of the next: remember the last query to halve the work.
        self.last_query = None

    def _w(self, t):
        if self.last_query is not None and self.last_query[0] == t:
            return self.last_query[1]
        values = [tree(t) for tree in self.trees]
        w = torch.stack(values) if self.batched else values[0]
        self.last_query = (t, w)
        return w

    def __call__(self, sigma, sigma_next):
        t, t_next = float(self.transform(float(sigma))), float(self.transform(float(sigma_next)))
        increment = self._w(t_next) - self._w(t)
        return (increment / math.sqrt(abs(t_next - t))).to(device=self.device, dtype=self.dtype)
