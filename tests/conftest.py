"""Process-wide test set-up, run before any test module is imported.

Triton fixes whether a @triton.jit function is compiled or interpreted when the function is decorated, i.e. when its
module is imported. Without a GPU the kernel tests need the interpreter, and a module imported earlier in the same
pytest process (through diffusers or another test module) would otherwise pin the kernel helpers to compiled mode, so
the interpreter is switched on here, once, for the whole run.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
