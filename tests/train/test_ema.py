import pytest
import torch
from torch import nn

from fusedit.train.ema import EMA


def test_update_state_and_swap():
    layer = nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.fill_(0.0)
    ema = EMA(dict(layer.named_parameters()), decay=0.9)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    ema.update()
    torch.testing.assert_close(ema.state_dict()["weight"], torch.full((2, 2), 0.1))
    ema.update()
    torch.testing.assert_close(ema.state_dict()["weight"], torch.full((2, 2), 0.19))
    with ema.swapped_in():
        torch.testing.assert_close(layer.weight, torch.full((2, 2), 0.19))
    assert torch.equal(layer.weight, torch.ones(2, 2))

    other = EMA(dict(layer.named_parameters()), decay=0.9)
    other.load_state_dict({k: v.clone() for k, v in ema.state_dict().items()})
    assert torch.equal(other.state_dict()["weight"], ema.state_dict()["weight"])
    other.copy_to_params()
    torch.testing.assert_close(layer.weight, torch.full((2, 2), 0.19))


def test_errors():
    layer = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="decay"):
        EMA(dict(layer.named_parameters()), decay=1.0)
    ema = EMA(dict(layer.named_parameters()), decay=0.5)
    with pytest.raises(KeyError, match="missing.*bias"):
        ema.load_state_dict({"weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="shape"):
        ema.load_state_dict({"weight": torch.zeros(3, 2), "bias": torch.zeros(2)})
