"""Test-only helpers for tests/test_samplers*.py: k-diffusion's sampling/external modules loaded from their files
(the package __init__ imports torchvision, which is not installed), and the analytic Gaussian denoising problem.

Data x0 ~ N(mu, s**2 I) has the exact denoiser D(x, sigma) = mu + s**2 / (s**2 + sigma**2) (x - mu), and the
probability-flow ODE dx/dsigma = (x - D) / sigma has the closed-form solution
x(sigma) = mu + (x(sigma_0) - mu) sqrt(s**2 + sigma**2) / sqrt(s**2 + sigma_0**2).
"""

import importlib.util
import math
import sys
import types
from pathlib import Path

import torch


def load_k_diffusion():
    """k-diffusion's sampling and external modules, loaded from their files with a stand-in for the utils module
    (whose imports need torchvision); both only use utils.append_dims. Returns (sampling, external)."""
    spec = importlib.util.find_spec('k_diffusion')
    if spec is None:
        raise ImportError('k-diffusion is not installed (pip install --no-deps k-diffusion)')
    package_dir = Path(spec.submodule_search_locations[0])
    package = types.ModuleType('k_diffusion_oracle')
    package.__path__ = [str(package_dir)]
    package.utils = types.ModuleType('k_diffusion_oracle.utils')
    package.utils.append_dims = lambda x, target_dims: x[(...,) + (None,) * (target_dims - x.ndim)]
    sys.modules.update({'k_diffusion_oracle': package, 'k_diffusion_oracle.utils': package.utils})
    for name in ('sampling', 'external'):
        module_spec = importlib.util.spec_from_file_location(f'k_diffusion_oracle.{name}', package_dir / f'{name}.py')
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = module
        module_spec.loader.exec_module(module)
        setattr(package, name, module)
    return package.sampling, package.external


k_sampling, k_external = load_k_diffusion()


class GaussianProblem:
    """Data ~ N(mu, s**2) per element, with mu varying across elements so errors are not uniform."""

    def __init__(self, shape=(2, 3, 4, 4), data_std=0.7, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.shape = shape
        self.mu = torch.randn(shape[1:], generator=generator) * 0.5
        self.s = data_std
        self.calls = 0

    def denoiser(self, x, sigma, **extra):
        """The exact D(x, sigma); sigma: [B]."""
        self.calls += 1
        sigma = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        return self.mu + self.s ** 2 / (self.s ** 2 + sigma ** 2) * (x - self.mu)

    def exact_ode_solution(self, x_start, sigma_start, sigma_end):
        scale = math.sqrt(self.s ** 2 + sigma_end ** 2) / math.sqrt(self.s ** 2 + sigma_start ** 2)
        return self.mu + (x_start - self.mu) * scale

    def start(self, sigma_max, seed=1, dtype=torch.float32):
        generator = torch.Generator().manual_seed(seed)
        return (torch.randn(self.shape, generator=generator) * math.sqrt(self.s ** 2 + sigma_max ** 2)
                + self.mu).to(dtype)


class NoiseQueue:
    """A noise sampler that hands out pre-drawn noise in call order and records the (sigma, sigma_next) it was asked
    for, so two implementations can be fed identical noise and their call sequences compared."""

    def __init__(self, shape, count=400, seed=5):
        generator = torch.Generator().manual_seed(seed)
        self.noise = [torch.randn(shape, generator=generator) for _ in range(count)]
        self.calls = []

    def __call__(self, sigma, sigma_next):
        self.calls.append((float(sigma), float(sigma_next)))
        return self.noise[len(self.calls) - 1]
