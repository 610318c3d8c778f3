"""The allocator set for tensor work (index.core.allocator): large buffers reused, not re-faulted."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_PROBE = """
import json, resource, sys, torch
from index.core.allocator import tune_allocator
tuned = tune_allocator() if sys.argv[1] == "tuned" else False
torch.set_num_threads(1)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                          torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU())
x = torch.rand(8, 3, 128, 128)                 # activations of 8 MiB each, as a CNN forward has
with torch.inference_mode():
    net(x), net(x)                             # warm-up
    faults = []
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        net(x)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"tuned": tuned, "faults": faults}))
"""

def _probe(mode: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "VFM_MALLOC": ""}
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, env=env,
                         check=True, timeout=120).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_large_buffers_are_reused_instead_of_faulted_in_again():
    default, tuned = _probe("default"), _probe("tuned")
    assert tuned["tuned"] is True
    # glibc's default maps each activation anew and faults its pages in again (measured: 2,000 to
    # 10,000 a forward, medians 4,000 to 10,000); set, the buffers of the first forwards are reused (measured: 0, with now and
    # then one forward that grows the heap once, 2,048). Medians over 8 forwards: one odd forward
    # either way decides nothing
    typical_default, typical_tuned = statistics.median(default["faults"]), statistics.median(tuned["faults"])
    assert typical_default > 2_000, default
    assert typical_tuned < typical_default / 20, (tuned, default)


def test_it_can_be_left_off(monkeypatch):
    from index.core import allocator

    monkeypatch.setattr(allocator, "_done", None)
    monkeypatch.setenv("VFM_MALLOC", "default")
    assert allocator.tune_allocator() is False
    monkeypatch.setattr(allocator, "_done", True)   # the session's own setting, restored
