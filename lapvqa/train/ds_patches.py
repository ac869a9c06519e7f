"""One DeepSpeed hot spot replaced by a batched equivalent, on the optimizer instance only.

ZeRO-1/2's overflow check (``bf16.check_grad_overflow``, which is what skips a non-finite step)
tests every gradient tensor separately: amax, amin, two isfinite, and, not, add -- about 7 small
ops per tensor, ~2,900 per step at the card's 419 tensors, each a kernel launch on a GPU
(``benchmarks/ds_overhead.py`` counts them). The same answer comes from one multi-tensor kernel:
the infinity norm of each gradient is finite exactly when the gradient is (|x| max propagates NaN
and turns -inf into +inf), so ``torch._foreach_norm`` over all of them, stacked, decides it.

The replacement is bound to the optimizer instance (``types.MethodType``), never to DeepSpeed's
class, and only when the instance has the attributes the original reads; otherwise DeepSpeed's
own check stays and the reason is logged. ``tests/test_ds_patches.py`` checks the replacement
against DeepSpeed's original on finite, NaN, +-inf, empty and missing gradients.
"""

from __future__ import annotations

import logging
import types

import torch

log = logging.getLogger(__name__)

_METHOD = "has_overflow_partitioned_grads_serial"


def _batched_has_overflow(self) -> torch.Tensor:
    """Same contract as DeepSpeedZeroOptimizer.has_overflow_partitioned_grads_serial: a [1] bool
    tensor on the device, True if any averaged gradient holds a NaN or an infinity."""
    grads = [g for i in range(len(self.bit16_groups)) for g in (self.averaged_gradients[i] or ())
             if g is not None and g.numel() > 0]
    if not grads:
        return torch.zeros(1, dtype=torch.bool, device=self.device)
    if any(g.is_sparse for g in grads):  # no foreach kernel for sparse: DeepSpeed's own loop
        return _class_method(self)(self)
    maxabs = torch._foreach_norm(grads, float("inf"))
    return torch.isfinite(torch.stack(maxabs)).all().logical_not().reshape(1)


def _class_method(obj):
    for cls in type(obj).__mro__:
        if _METHOD in cls.__dict__:
            return cls.__dict__[_METHOD]
    raise AttributeError(_METHOD)


def batch_overflow_check(optimizer) -> bool:
    """Install the batched overflow check on a DeepSpeed ZeRO-1/2 optimizer; True if installed."""
    missing = [a for a in (_METHOD, "bit16_groups", "averaged_gradients", "device")
               if not hasattr(optimizer, a)]
    if missing:
        log.info("DeepSpeed overflow check left as is (%s has no %s)", type(optimizer).__name__,
                 ", ".join(missing))
        return False
    setattr(optimizer, _METHOD, types.MethodType(_batched_has_overflow, optimizer))
    return True
