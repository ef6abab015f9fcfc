"""Emulate a second device on CPU (a GPU partner's path, checked on CPU-only CI; written by a review).

Importing this module patches ``torch.tensor``, ``torch.as_tensor`` and ``Tensor.numpy``: use it only in a
process of its own (tests/test_device_path.py runs it in a subprocess).

Emulate a second device on CPU: tensors 'on the device' are wrapper subclasses reporting device
meta (data kept in a CPU `inner`). Any op mixing a device tensor with a non-0-dim plain CPU tensor raises
like CUDA would ("Expected all tensors to be on the same device"); .numpy() on a device tensor raises."""
from __future__ import annotations

import traceback
from pathlib import Path

import torch
from torch.utils._pytree import tree_map, tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode

FAKE = torch.device("meta")
aten = torch.ops.aten
ALLOWED_MIX = {aten.copy_.default, aten._to_copy.default, aten.index.Tensor, aten.index_put_.default,
               aten.index_put.default, aten._index_put_impl_.default, aten.lift_fresh.default,
               aten.detach.default, aten.alias.default}
NOTES = []


ROOT = str(Path(__file__).resolve().parents[1]) + "/"


def where() -> list[str]:
    """The project's frames on the stack (this harness left out): where a mismatch happened."""
    return [f"{f.filename.replace(ROOT, '')}:{f.lineno} {f.line}" for f in traceback.extract_stack()
            if f.filename.startswith(ROOT) and not f.filename.endswith("fake_device.py")][-4:]


class Dev(torch.Tensor):
    @staticmethod
    def __new__(cls, inner):
        r = torch.Tensor._make_wrapper_subclass(cls, inner.size(), strides=inner.stride(),
                                                storage_offset=inner.storage_offset(), dtype=inner.dtype,
                                                device=FAKE, requires_grad=inner.requires_grad, layout=inner.layout)
        r.inner = inner
        return r

    def __tensor_flatten__(self):
        return ["inner"], None

    @staticmethod
    def __tensor_unflatten__(inner_tensors, meta, outer_size, outer_stride):
        return Dev(inner_tensors["inner"])

    def __repr__(self):
        return f"Dev({self.inner!r})"

    def __reduce_ex__(self, proto):  # torch.save of a CUDA tensor: loadable with map_location="cpu"
        return self.inner.__reduce_ex__(proto)

    def tolist(self):  # CUDA tensors support tolist (a device-to-host copy)
        return self.inner.tolist()

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        with FakeDevice():
            return func(*args, **(kwargs or {}))


def _is_fake(d):
    return d is not None and torch.device(d).type == "meta"


class FakeDevice(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        leaves = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        has_dev = any(isinstance(t, Dev) for t in leaves)
        plain = [t for t in leaves if not isinstance(t, Dev) and t.dim() > 0]
        if has_dev and plain and func not in ALLOWED_MIX:
            shapes = [tuple(t.shape) for t in plain]
            raise RuntimeError(f"FAKE-CUDA MISMATCH in {func}: CPU tensors {shapes} meet device tensors\n  at "
                               + "\n  at ".join(where()))
        if has_dev and plain and func in (aten.index.Tensor, aten.index_put_.default, aten._index_put_impl_.default):
            NOTES.append(("cpu-index-on-device (allowed on CUDA)", str(func), where()))
        to_dev = _is_fake(kwargs.get("device"))
        if to_dev:
            kwargs["device"] = torch.device("cpu")
        # unwrap
        uargs, ukwargs = tree_map(lambda t: t.inner if isinstance(t, Dev) else t, (args, kwargs))
        out = func(*uargs, **ukwargs)
        if func is aten._to_copy.default and "device" in kwargs and not to_dev:
            return out  # .cpu(): a plain CPU tensor
        if func is aten._local_scalar_dense.default:
            return out
        wrap = has_dev or to_dev
        if not wrap:
            return out
        # in-place ops: return the (wrapped) self argument
        if func._schema.is_mutable and isinstance(args[0], Dev) and func.name().endswith("_"):
            return args[0]
        return tree_map(lambda t: Dev(t) if isinstance(t, torch.Tensor) and not isinstance(t, Dev) else t, out)


_orig_numpy = torch.Tensor.numpy


def _numpy(self, *a, **k):
    if isinstance(self, Dev):
        raise TypeError("FAKE-CUDA: can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() first.\n  at "
                        + "\n  at ".join(where()))
    return _orig_numpy(self, *a, **k)


torch.Tensor.numpy = _numpy


_orig_tensor, _orig_as_tensor = torch.tensor, torch.as_tensor


def _tensor(data, *a, device=None, **k):
    if _is_fake(device):
        return _orig_tensor(data, *a, **k).to(FAKE)
    return _orig_tensor(data, *a, device=device, **k)


def _as_tensor(data, *a, device=None, **k):
    if _is_fake(device):
        return _orig_as_tensor(data, *a, **k).to(FAKE)
    return _orig_as_tensor(data, *a, device=device, **k)


torch.tensor, torch.as_tensor = _tensor, _as_tensor
