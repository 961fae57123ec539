"""torchvision's own model files, imported without `torchvision/__init__.py`.

torchvision's compiled extension (`_C.so`) does not load against the CPU torch
used here: `import torchvision` fails with "operator torchvision::nms does not
exist".  The model files themselves are plain Python over torch.nn.  So this
module registers bare package modules for `torchvision` and its sub-packages
(`models`, `models.detection` and `ops` import the compiled ops, through
`ops.boxes`; `transforms` imports Pillow; `models.segmentation` every
segmentation model), each with the installed folder as its `__path__`:
importing `torchvision.models.resnet` then runs resnet.py and the files it
imports, nothing else.  Three small modules stand in for files
the models need only in passing:

- `torchvision.extension`: reports no compiled ops, so nothing can load `_C`;
- `torchvision.utils`: its two helpers the models call (the real file imports
  Pillow, which is not installed);
- `torchvision.transforms.functional`: `InterpolationMode`, which the weights'
  preprocessing presets name (the real file imports Pillow too).

torchvision is installed with `pip install --no-deps torchvision==0.28.0`
(.ci/run); without it, `tv_model` skips the calling test.
"""
import collections.abc
import enum
import importlib
import importlib.machinery
import importlib.util
import itertools
import os
import sys
import types

import pytest

_BARE = ["torchvision", "torchvision.models", "torchvision.models.segmentation", "torchvision.models.detection",
         "torchvision.ops", "torchvision.transforms"]


def _add(name, module):
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)
    return module


def _no_ops():
    raise RuntimeError("torchvision's compiled ops are not loaded: the tests import its model files only")


def _install():
    if "torchvision.models" in sys.modules:  # already importable (a real torchvision, or installed before)
        return
    spec = importlib.util.find_spec("torchvision")  # locates the package without running its __init__
    if spec is None:
        pytest.skip("torchvision is not installed (pip install --no-deps torchvision==0.28.0, as in .ci/run)",
                    allow_module_level=True)
    root = spec.submodule_search_locations[0]
    for name in _BARE:
        pkg = importlib.util.module_from_spec(importlib.machinery.ModuleSpec(name, None, is_package=True))
        pkg.__path__ = [os.path.join(root, *name.split(".")[1:])]
        _add(name, pkg)
    _add("torchvision.extension", types.ModuleType("torchvision.extension")).__dict__.update(
        _has_ops=lambda: False, _assert_has_ops=_no_ops)
    _add("torchvision.utils", types.ModuleType("torchvision.utils")).__dict__.update(
        _log_api_usage_once=lambda obj: None,
        _make_ntuple=lambda x, n: tuple(x) if isinstance(x, collections.abc.Iterable) else tuple(itertools.repeat(x, n)))
    modes = enum.Enum("InterpolationMode", {m.upper().replace("-", "_"): m for m in
                                            ["nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos"]})
    _add("torchvision.transforms.functional", types.ModuleType("torchvision.transforms.functional")).InterpolationMode = modes
    sys.modules["torchvision.transforms"].InterpolationMode = modes
    # efficientnet.py imports StochasticDepth from the package (its __init__ re-exports it)
    sys.modules["torchvision.ops"].StochasticDepth = importlib.import_module("torchvision.ops.stochastic_depth").StochasticDepth


def tv_module(module_name):
    """A torchvision module by its name under torchvision.models: "resnet", "segmentation.deeplabv3", ..."""
    _install()
    return importlib.import_module(f"torchvision.models.{module_name}")


def tv_model(module_name, factory_name, **kwargs):
    """torchvision's model, untrained: tv_model("resnet", "resnext50_32x4d")."""
    return getattr(tv_module(module_name), factory_name)(weights=None, **kwargs)
