"""Process-wide test set-up, run before any test module is imported.

Triton fixes whether a @triton.jit function is compiled or interpreted when the function is decorated, i.e. when its
module is imported. Without a GPU the kernel tests need the interpreter, and a module imported earlier in the same
pytest process (through diffusers or another test module) would otherwise pin the kernel helpers to compiled mode, so
the interpreter is switched on here, once, for the whole run.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one thread (`pytestmark = pytest.mark.usefixtures("one_thread")`): on tiny tensors two
    threads oversubscribe the shared CPUs (2-thread tiny convs were 50x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
