"""The one-pass capture's window codes (atlas/build/capture.py: deconv.switches.window_codes in place, on
a batch) are the codes of one image's indices as the two-pass path computes them, and both name the input
position max-pool chose: checked here against F.max_pool2d's own indices on maps full of ties, with
padding, ceil mode, both memory layouts and a batch."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from atlas.deconv.switches import window_codes
from atlas.net.layer_base import Geometry


def pooled(kernel, stride, padding, ceil, size, channels_last, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randint(-2, 3, (3, 5, size, size), generator=g).float())  # ReLU zeros: ties
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    _, idx = F.max_pool2d(x, kernel, stride, padding, ceil_mode=ceil, return_indices=True)
    out = idx.shape[-1]
    return idx, Geometry(kernel=kernel, stride=stride, padding=padding, in_size=size, out_size=out, rf_size=0,
                         jump=0, offset=0)


@pytest.mark.parametrize("kernel,stride,padding,ceil,size", [
    (3, 2, 0, True, 26), (3, 2, 0, True, 27), (3, 2, 1, False, 16), (2, 2, 0, False, 12), (5, 3, 2, True, 19),
    (3, 1, 1, False, 9)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_codes_equal_the_switches_module_and_max_pool(kernel, stride, padding, ceil, size, channels_last):
    idx, geom = pooled(kernel, stride, padding, ceil, size, channels_last, seed=size + kernel)
    want = np.stack([window_codes(idx[i], geom) for i in range(idx.shape[0])])
    # the codes decoded back: each names the input position max-pool chose
    oy = (np.arange(idx.shape[2]) * stride - padding)[:, None]
    ox = (np.arange(idx.shape[3]) * stride - padding)[None, :]
    got = window_codes(idx.clone(), geom, in_place=True)
    assert got.dtype == np.uint8 and got.flags["C_CONTIGUOUS"] and got.shape == tuple(idx.shape)
    np.testing.assert_array_equal(got, want)
    chosen = (oy + got // kernel) * size + (ox + got % kernel)
    np.testing.assert_array_equal(chosen, idx.numpy())


def test_batch_codes_use_the_indices_up():
    """The capture hands over its indices: overwritten, not copied (a batch's pool1 indices are 150 MB)."""
    idx, geom = pooled(3, 2, 0, True, 26, True, seed=1)
    before = idx.clone()
    window_codes(idx, geom, in_place=True)
    assert not torch.equal(idx, before)
