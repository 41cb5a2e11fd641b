"""Convergence orders of the deterministic samplers against the closed-form probability-flow ODE solution of the
Gaussian problem (see sampler_oracles.GaussianProblem).

We integrate from sigma = 10 to sigma = 0.1 (no final step to 0, whose special-cased first-order step would hide the
order) on schedules evenly spaced in log sigma, in float64 so round-off stays far below the errors, and measure
the observed order log2(error(n) / error(2n)) over successive doublings of the step count n.
"""

import math

import pytest
import torch

import samplers
from sampler_oracles import GaussianProblem

SIGMA_START, SIGMA_END = 10.0, 0.1


def log_spaced(n):
    levels = torch.exp(torch.linspace(math.log(SIGMA_START), math.log(SIGMA_END), n + 1, dtype=torch.float64))
    levels[0], levels[-1] = SIGMA_START, SIGMA_END
    return levels


def observed_orders(run, step_counts):
    problem = GaussianProblem()
    problem.mu = problem.mu.double()
    x = problem.start(SIGMA_START).double()
    exact = problem.exact_ode_solution(x, SIGMA_START, SIGMA_END)
    errors = [float((run(problem.denoiser, x, n) - exact).abs().max()) for n in step_counts]
    return [math.log2(errors[k] / errors[k + 1]) for k in range(len(errors) - 1)]


def on_schedule(function, **options):
    return lambda model, x, n: function(model, x, log_spaced(n), disable=True, **options)


# name -> (run, step counts, (lowest, highest) accepted observed order)
CASES = {
    'euler': (on_schedule(samplers.sample_euler), (16, 32, 64), (0.9, 1.2)),
    'ddim': (on_schedule(samplers.sample_ddim), (16, 32, 64), (0.9, 1.2)),
    'heun': (on_schedule(samplers.sample_heun), (32, 64, 128), (1.85, 2.3)),
    'dpm_2': (on_schedule(samplers.sample_dpm_2), (32, 64, 128), (1.85, 2.3)),
    'dpmpp_2m': (on_schedule(samplers.sample_dpmpp_2m), (32, 64, 128), (1.85, 2.3)),
    'dpmpp_2s_ancestral (eta 0)': (on_schedule(samplers.sample_dpmpp_2s_ancestral, eta=0.0), (32, 64, 128),
                                   (1.85, 2.3)),
    'dpmpp_sde (eta 0)': (on_schedule(samplers.sample_dpmpp_sde, eta=0.0, noise_sampler=lambda a, b: 0.0),
                          (32, 64, 128), (1.85, 2.3)),
    'dpmpp_2m_sde midpoint (eta 0)': (on_schedule(samplers.sample_dpmpp_2m_sde, eta=0.0), (32, 64, 128), (1.85, 2.3)),
    'dpmpp_2m_sde heun (eta 0)': (on_schedule(samplers.sample_dpmpp_2m_sde, eta=0.0, solver_type='heun'),
                                  (32, 64, 128), (1.85, 2.3)),
    # Multistep methods started with a first-order step: that step's O(h^2) local error caps the global order at 2.
    'dpmpp_3m_sde (eta 0)': (on_schedule(samplers.sample_dpmpp_3m_sde, eta=0.0), (32, 64, 128), (1.85, 2.3)),
    'plms': (on_schedule(samplers.sample_plms), (32, 64, 128), (1.85, 2.3)),
    # LMS ramps up to order 4; at these step counts it shows ~3.3 before the Euler start-up step takes over (-> 2).
    'lms': (on_schedule(samplers.sample_lms), (16, 32, 64), (2.8, 4.0)),
    # UniPC-p with its corrector is of order p + 1; with lower_order_final the last step is first order (-> 2).
    'unipc bh1 order 1': (on_schedule(samplers.sample_unipc, variant='bh1', order=1, lower_order_final=False),
                          (32, 64, 128), (1.85, 2.3)),
    'unipc bh2 order 2': (on_schedule(samplers.sample_unipc, variant='bh2', order=2, lower_order_final=False),
                          (32, 64, 128), (2.85, 3.3)),
    'unipc bh1 order 2': (on_schedule(samplers.sample_unipc, variant='bh1', order=2, lower_order_final=False),
                          (32, 64, 128), (2.85, 3.3)),
    'unipc bh2 order 3': (on_schedule(samplers.sample_unipc, variant='bh2', order=3, lower_order_final=False),
                          (32, 64, 128), (3.7, 4.3)),
    'unipc bh1 order 3': (on_schedule(samplers.sample_unipc, variant='bh1', order=3, lower_order_final=False),
                          (32, 64, 128), (3.7, 5.0)),
    'unipc bh1 order 3, lower_order_final': (on_schedule(samplers.sample_unipc, variant='bh1', order=3),
                                             (32, 64, 128), (1.85, 2.3)),
    # DPM-Solver-fast with n = 2 (mod 3) model evaluations: third-order steps and a final second-order one.
    'dpm_fast': (lambda model, x, nfe: samplers.sample_dpm_fast(model, x, SIGMA_END, SIGMA_START, nfe, disable=True),
                 (26, 50, 98), (2.85, 3.3)),
}


@pytest.mark.parametrize('name', list(CASES))
def test_sampler_converges_at_its_order(name):
    run, step_counts, (lowest, highest) = CASES[name]
    orders = observed_orders(run, step_counts)
    assert all(lowest <= order <= highest for order in orders), f'{name}: observed orders {orders}'


def test_dpm_adaptive_error_follows_its_tolerance():
    problem = GaussianProblem()
    problem.mu = problem.mu.double()
    x = problem.start(SIGMA_START).double()
    exact = problem.exact_ode_solution(x, SIGMA_START, SIGMA_END)
    previous_nfe = 0
    for rtol in (1e-2, 1e-3, 1e-4):
        out, info = samplers.sample_dpm_adaptive(problem.denoiser, x, SIGMA_END, SIGMA_START, rtol=rtol,
                                                 atol=rtol / 10, disable=True, return_info=True)
        assert float((out - exact).abs().max()) < 10 * rtol
        assert info['nfe'] > previous_nfe
        previous_nfe = info['nfe']
