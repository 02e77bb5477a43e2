"""Lets PyPI's torchvision import next to a CPU-only torch (the test environment's torch==2.13.0+cpu).

PyPI's torchvision wheels for Linux are CUDA builds: their C++ extension (`torchvision._C`) needs
libtorch_cuda.so, so on a CPU torch it does not load. torchvision is built to go on without it
(`torchvision.extension._has_ops()` is then False), except that `torchvision/_meta_registrations.py`
registers fake kernels for `torchvision::nms` and `torchvision::qnms` unconditionally, which fails
with "operator torchvision::nms does not exist" and makes `import torchvision` (and every package
that imports it: transformers, diffusers, lpips, pytorch-fid, open_clip) fail. The CPU wheels live
only on download.pytorch.org, which the machines this project tests on cannot reach.

This module is imported at interpreter start by `dpdmd_torchvision_cpu_ops.pth` (installed by
`requirements-dev.txt`). It imports nothing heavy: it only watches for `torchvision.extension`, and
if the extension did not load, it declares the two operators' schemas (no kernels: calling nms
would still fail, which nothing in this project does), so the rest of torchvision imports. With a
torchvision whose extension loads, it does nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor",
)
_LIBRARY = []  # keeps the torch.library.Library alive (its definitions go away with it)


def _declare_missing_ops(extension) -> None:
    if extension._has_ops():
        return
    import torch  # noqa: PLC0415 (only once torchvision itself is being imported)

    library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        library.define(schema)
    _LIBRARY.append(library)


class _Loader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        _declare_missing_ops(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "torchvision.extension":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


if not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.insert(0, _Finder())
