"""The batched overflow check (lapvqa.train.ds_patches) gives DeepSpeed's answer, per case."""

from __future__ import annotations

import logging

import pytest
import torch
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer as Original

from lapvqa.train.ds_patches import _METHOD, batch_overflow_check


class FakeZero:
    """Exactly what DeepSpeed's check reads (bit16_groups, averaged_gradients, _has_inf_or_nan),
    with DeepSpeed's own method as the class attribute the patch must leave alone."""
    _has_inf_or_nan = Original.__dict__["_has_inf_or_nan"]
    locals()[_METHOD] = Original.__dict__[_METHOD]

    def __init__(self, groups):
        self.bit16_groups = [[None]] * len(groups)
        self.averaged_gradients = dict(enumerate(groups))
        self.device = "cpu"


def _t(*values, dtype=torch.bfloat16):
    return torch.tensor(values, dtype=dtype)


CASES = {
    "finite": [[_t(1.0, -2.0), _t(3.0)], [_t(0.5, dtype=torch.float32)]],
    "nan": [[_t(1.0), _t(float("nan"), 1.0)], [_t(0.5)]],
    "+inf second group": [[_t(1.0)], [_t(2.0, float("inf"))]],
    "-inf fp32": [[_t(float("-inf"), dtype=torch.float32)]],
    "empty and none": [[torch.zeros(0, dtype=torch.bfloat16), None, _t(1.0)]],
    "all empty": [[torch.zeros(0)], None],
    "huge but finite": [[_t(3.0e38, dtype=torch.float32), _t(-3.0e38, dtype=torch.float32)]],
}


@pytest.mark.parametrize("name", CASES)
def test_batched_check_equals_deepspeeds(name):
    opt = FakeZero(CASES[name])
    groups = CASES[name]
    if any(g is None for g in groups):  # DeepSpeed's loop cannot iterate a None group; ours can
        want = torch.tensor([False])
    else:
        want = Original.__dict__[_METHOD](opt)
    assert batch_overflow_check(opt)
    got = getattr(opt, _METHOD)()
    assert got.dtype == torch.bool and got.shape == (1,) and bool(got) == bool(want), (got, want)
    assert FakeZero.__dict__[_METHOD] is Original.__dict__[_METHOD]  # the class is untouched
    assert getattr(FakeZero(groups), _METHOD).__func__ is Original.__dict__[_METHOD]


def test_not_installed_on_an_unknown_optimizer(caplog):
    caplog.set_level(logging.INFO, logger="lapvqa.train.ds_patches")
    assert not batch_overflow_check(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1))
    assert "left as is" in caplog.text
