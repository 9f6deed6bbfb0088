"""moonforge.parallel.comm.host_values_later: the values of a small device tensor, read on the host without
waiting for the work queued after the read was started (on a GPU; off one, read at once)."""

from __future__ import annotations

import pytest
import torch

from moonforge.parallel.comm import host_values_later

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_values_are_the_tensors_at_the_time_of_the_call(device):
    counts = torch.tensor([[3, 0, 7], [1, 2, 5]], device=device)
    later = host_values_later(counts)
    counts.add_(100)  # queued after the copy: must not show in the values
    if device == "cuda":
        a = torch.randn(4096, 4096, device=device)
        for _ in range(8):  # keep the GPU busy past the read
            a = a @ a / 64
    assert later() == [[3, 0, 7], [1, 2, 5]]
    assert later() == [[3, 0, 7], [1, 2, 5]]  # may be called again
