import math

import pytest
import torch

from fusedit.train.schedules import build_lr_scheduler, lr_multiplier


def lrs(name, steps, **kw):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_lr_scheduler(opt, name, lr=1.0, **kw)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_constant_and_warmup():
    assert lrs("constant", 3) == [1.0, 1.0, 1.0]
    assert lrs("warmup", 6, warmup_steps=4) == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_cosine_reaches_min_lr():
    values = lrs("cosine", 12, warmup_steps=2, total_steps=10, min_lr=0.1)
    assert values[:2] == pytest.approx([0.5, 1.0])
    assert values[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert values[10:] == pytest.approx([0.1, 0.1])
    assert all(a >= b for a, b in zip(values[1:], values[2:], strict=False))


def test_errors():
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_multiplier("linear")
    with pytest.raises(ValueError, match="min_lr"):
        lrs("cosine", 1, min_lr=2.0)
