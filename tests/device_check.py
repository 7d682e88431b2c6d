"""A device check that runs on CPU and fails where CUDA would: the code under test is given DEVICE,
torch.device("cpu", 0), as its GPU, and every tensor it puts there is tracked as a device tensor while the
arithmetic still runs on the CPU.

What it models (CUDA's placement rules, NCCL's):
  mixed           an op with device inputs and a host input of one or more dimensions (CUDA takes only 0-dim host
                  tensors beside device ones); host indices into a device tensor are allowed, as on CUDA
  device->host    an in-place or out= op writing a device value into a host tensor (`host_total += device_loss`)
  host->device    an in-place or out= op writing a host tensor of one or more dimensions into a device tensor
                  (copy_ is legal both ways: it is how data moves)
  nccl-host       a collective (c10d) handed a host tensor: NCCL takes device tensors only (gloo runs in its place)
What counts as DEVICE: the storages of tensors made with device=DEVICE or moved there with .to(DEVICE) (the module's
parameters and buffers after model.to(DEVICE) included), FSDP2's own buffers (its mesh device is pointed at DEVICE)
and the results of every op with a device input. Everything else is HOST, including x.cpu() and x.to("cpu") of a
device tensor: on a CPU those return x itself, so the check returns a copy, as CUDA does.
A device tensor reports DEVICE as its .device, so `device=x.device` carries the tag.
What it does not model: code that branches on device.type == "cuda" (DEVICE's type is "cpu"; those paths run as
on a CPU), streams and asynchronous copies, memory, dtypes CUDA lacks, and ops CUDA would refuse for other reasons.

    with DeviceCheck() as check:          # the code under test must use device_check.DEVICE as its device
        run()
    assert check.violations == [], check.report()
"""

import sys
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

DEVICE = torch.device("cpu", 0)  # "the GPU": index 0 tells it apart from plain cpu at the Python level
ROOT = Path(__file__).resolve().parents[1]
_THIS = str(Path(__file__).resolve())
_DEVICE_GETTER = torch._C.TensorBase.device
_MOVES = {torch.Tensor.to, torch.Tensor.cpu}
# how data moves between devices: legal across them
_MOVES_ACROSS = {torch.ops.aten.copy_, torch.ops.aten._to_copy, torch.ops.aten.to}
_INDEXING = {
    torch.ops.aten.index.Tensor,
    torch.ops.aten.index_put_.default,
    torch.ops.aten._index_put_impl_.default,
}
_NOT_DATA = {"barrier", "monitored_barrier"}  # c10d ops whose tensor is the process group's own placeholder


@dataclass(frozen=True)
class Violation:
    rule: str  # mixed | device->host | host->device | nccl-host
    op: str  # the aten / c10d op
    where: str  # file:line of the innermost frame inside the repository, < its caller's

    def __str__(self):
        return f"{self.rule:12} {self.op:30} {self.where}"


def _is_device(x):
    return isinstance(x, torch.device) and x == DEVICE or isinstance(x, str) and torch.device(x) == DEVICE


def _tensors(tree):
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _storage(t):
    t = getattr(t, "_local_tensor", t)  # a DTensor (FSDP2's parameters): its local shard holds the data
    try:
        return (
            t.untyped_storage()
        )  # one Python object per storage (torch keeps it), so `is` and weak sets work
    except (RuntimeError, NotImplementedError):  # no storage (meta, other wrapper subclasses): host
        return None


def _repo_location():
    """'file:line < caller:line', the innermost two frames inside the repository (a helper and its caller)."""
    places, f = [], sys._getframe(1)
    while f is not None and len(places) < 2:
        name = f.f_code.co_filename
        if name.startswith(str(ROOT)) and name != _THIS and "site-packages" not in name:
            places.append(f"{Path(name).relative_to(ROOT)}:{f.f_lineno}")
        f = f.f_back
    return " < ".join(places) or "?"


class _Functions(TorchFunctionMode):
    """The Python level: moves (.to, .cpu, device=) that a CPU would turn into aliases of their input."""

    def __init__(self, check):
        super().__init__()
        self.check = check

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _MOVES:
            # _parse_to reads .to()'s device, dtype and memory format; copy= and non_blocking= are not its business
            parsed = {k: v for k, v in kwargs.items() if k not in ("copy", "non_blocking")}
            target = (
                torch.device("cpu")
                if func is torch.Tensor.cpu
                else torch._C._nn._parse_to(*args[1:], **parsed)[0]
            )
        else:
            target = kwargs.get("device")  # a factory or torch.tensor / as_tensor given device=
        out = func(*args, **kwargs)
        if target is None or not isinstance(target, (str, torch.device)):
            return out
        to_device = _is_device(target)
        if not to_device and torch.device(target).type != "cpu":
            return out
        inputs = {id(s) for s in map(_storage, _tensors((args, kwargs))) if s is not None}
        moved = []
        for t in _tensors(out) if isinstance(out, (list, tuple)) else [out]:
            s = _storage(t)
            if s is not None and id(s) in inputs and self.check.on_device(t) != to_device:
                t = t.clone()  # CPU aliased the input where CUDA copies it to the other device
            self.check.mark(t, to_device)
            moved.append(t)
        return moved[0] if isinstance(out, torch.Tensor) else type(out)(moved)


class _Ops(TorchDispatchMode):
    """The op level (aten, c10d): the placement rules, and device-ness passed on from inputs to results."""

    def __init__(self, check):
        super().__init__()
        self.check = check

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        schema = func._schema
        written = [  # the arguments the op writes into: self of an in-place op, out=
            a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write
        ]
        named = dict(zip([a.name for a in schema.arguments], args), **kwargs)
        out = func(*args, **kwargs)
        if func.namespace == "c10d":
            if self.check.collectives == "nccl" and schema.name.split("::")[-1] not in _NOT_DATA:
                if any(not self.check.on_device(t) for t in _tensors((args, kwargs))):
                    self.check.record("nccl-host", func)
            return out
        targets = _tensors([named[n] for n in written])
        target_ids = {id(t) for t in targets}
        inputs = [t for t in _tensors(list(named.values())) if id(t) not in target_ids]
        if func in _INDEXING:  # host indices into a device tensor are fine: only self and values must agree
            inputs = [
                t for t in _tensors([named.get("self"), named.get("values")]) if id(t) not in target_ids
            ]
        on = [self.check.on_device(t) for t in inputs]
        device_in, host_in = any(on), any(not d and t.dim() > 0 for t, d in zip(inputs, on))
        if func.overloadpacket not in _MOVES_ACROSS:
            if targets:
                if device_in and not all(self.check.on_device(t) for t in targets):
                    self.check.record("device->host", func)
                elif host_in and any(self.check.on_device(t) for t in targets):
                    self.check.record("host->device", func)
            elif device_in and host_in:
                self.check.record("mixed", func)
        # a result of a device input or of device=DEVICE is on the device (in-place ops keep their place); an
        # explicit device="cpu" is seen above, in _Functions (here torch fills in the input's real device)
        if not targets and (device_in or _is_device(kwargs.get("device"))):
            for t in _tensors(out):
                self.check.mark(t, True)
        return out


class DeviceCheck:
    """`with DeviceCheck() as check:` records in check.violations (deduplicated by rule and place) every op CUDA
    (and NCCL, with collectives="nccl") would refuse, for code that uses DEVICE as its GPU."""

    def __init__(self, collectives="nccl"):
        self.collectives = collectives
        self.violations, self._seen = [], set()
        self._device = weakref.WeakSet()  # the storages on the device; freed ones drop out

    def on_device(self, t):
        s = _storage(t)
        return s is not None and s in self._device

    def mark(self, t, on_device):
        s = _storage(t)
        if s is not None:
            (self._device.add if on_device else self._device.discard)(s)

    def record(self, rule, func):
        where = _repo_location()
        if (rule, where) not in self._seen:
            self._seen.add((rule, where))
            self.violations.append(Violation(rule, str(func), where))

    def report(self):
        return "\n".join(["CUDA / NCCL would refuse:", *map(str, self.violations)])

    def __enter__(self):
        from torch.distributed.fsdp._fully_shard import _fully_shard

        # FSDP2 allocates its gathered parameters and buffers on its mesh's device, plain cpu for a CPU mesh
        self._fsdp_device = _fully_shard._get_device_from_mesh
        _fully_shard._get_device_from_mesh = lambda mesh: DEVICE
        # x.device answers DEVICE for a device tensor to every caller, in autograd's backward too (where no
        # TorchFunctionMode is active), so `device=x.device` carries the tag
        torch.Tensor.device = property(lambda t: DEVICE if self.on_device(t) else _DEVICE_GETTER.__get__(t))
        self._modes = [_Ops(self), _Functions(self)]
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)
        from torch.distributed.fsdp._fully_shard import _fully_shard

        _fully_shard._get_device_from_mesh = self._fsdp_device
        del torch.Tensor.device  # TensorBase's again
        return False
