"""pick_device: the one device rule indexing, curation and distillation share."""
from __future__ import annotations

import pytest
import torch

from index.core.errors import UserError
from index.device import DeviceUnavailable, pick_device


@pytest.mark.parametrize("cuda", [True, False])
def test_auto_picks_cuda_only_where_available(monkeypatch, cuda):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    for name in (None, "", "auto"):
        assert pick_device(name) == ("cuda" if cuda else "cpu")
    assert pick_device("cpu") == "cpu"


def test_cuda_refused_up_front_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:1"):
        with pytest.raises(DeviceUnavailable, match="CUDA is not available") as e:
            pick_device(name)
        assert isinstance(e.value, UserError)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == "cuda:1"
    with pytest.raises(DeviceUnavailable, match="2 CUDA device"):
        pick_device("cuda:2")


def test_unknown_device_lists_the_choices():
    with pytest.raises(UserError, match="valid choices: auto, cpu, cuda"):
        pick_device("gpu0")
