"""Test-only access to the reference packages behind the metrics tests, which cannot be imported the normal way.

torch-fidelity, clean-fid and pytorch-fid are installed with `--no-deps` (their dependencies pull torchvision, which
this project never installs), and their package `__init__`s import torchvision. The single files the tests need do
not: `torch_fidelity/feature_extractor_inceptionv3.py` (the FID Inception, no torchvision), its
`interpolate_compat_tensorflow.py`, and `cleanfid/resize.py`. They are loaded here as submodules of a package object
that has the real directory as its path but skips the `__init__`. torchmetrics' image metrics import
`torch_fidelity.feature_extractor_inceptionv3` the same way, so `torchmetrics()` registers that package first.
"""
import importlib
import importlib.util
import sys
import types

from oracles import find_oracle, import_oracle


def _package_without_init(name: str) -> types.ModuleType:
    """`name` as a package whose submodules load from the installed directory, without running its __init__."""
    existing = sys.modules.get(name)
    if existing is not None:
        return existing
    spec = find_oracle(name)
    package = types.ModuleType(name)
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules[name] = package
    return package


def torch_fidelity_module(submodule: str) -> types.ModuleType:
    _package_without_init("torch_fidelity")
    return importlib.import_module(f"torch_fidelity.{submodule}")


def cleanfid_resize() -> types.ModuleType:
    _package_without_init("cleanfid")
    return importlib.import_module("cleanfid.resize")


def torchmetrics() -> types.ModuleType:
    """The torchmetrics package with its image and multimodal metrics imported (torch-fidelity's __init__ is not
    importable, so its package is registered first)."""
    if importlib.util.find_spec("torch_fidelity") is not None:
        _package_without_init("torch_fidelity")
    package = import_oracle("torchmetrics")
    for submodule in ("image.inception", "image.kid", "functional.image.ssim", "functional.multimodal.clip_score"):
        importlib.import_module(f"torchmetrics.{submodule}")
    return package


def torch_fidelity_precision_recall() -> types.ModuleType:
    """torch-fidelity's `metric_prc` (precision/recall, Kynkäänniemi et al. 2019). Its k-NN functions need only torch,
    but the module imports four names of `torch_fidelity.utils`, which needs torchvision, for its command-line
    driver: while it loads, a stand-in `utils` without them is registered, then removed again."""
    _package_without_init("torch_fidelity")
    if "torch_fidelity.metric_prc" in sys.modules:
        return sys.modules["torch_fidelity.metric_prc"]
    stand_in = types.ModuleType("torch_fidelity.utils")
    for name in ("create_feature_extractor", "extract_featuresdict_from_input_id_cached", "resolve_feature_extractor",
                 "resolve_feature_layer_for_metric"):
        setattr(stand_in, name, None)
    previous = sys.modules.get("torch_fidelity.utils")
    sys.modules["torch_fidelity.utils"] = stand_in
    try:
        return importlib.import_module("torch_fidelity.metric_prc")
    finally:
        if previous is None:
            del sys.modules["torch_fidelity.utils"]
        else:
            sys.modules["torch_fidelity.utils"] = previous
