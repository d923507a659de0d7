"""Counts the ops that move data between devices, to show a loop copies nothing from the host.

Under :class:`CrossDeviceOps` every aten op is recorded whose tensors (arguments and
results) live on more than one device: a host-to-device copy is ``aten._to_copy`` from
``cpu`` to the device. Run on the ``meta`` device it needs no GPU: a CPU table moved to
``meta`` shows exactly as one moved to ``cuda`` would.
"""

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class CrossDeviceOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, set[torch.device]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        devices = {a.device for a in tree_flatten((args, kwargs, out))[0] if isinstance(a, torch.Tensor)}
        if len(devices) > 1:
            self.ops.append((str(func), devices))
        return out
