"""spatial_max (atlas/mining.py) against numpy: the maximum of each map and its first position in
row-major order, on maps full of ties (where a faster reduction could pick another position), in both
memory layouts and both precisions the build runs in."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from atlas.mining import spatial_max


def reference(act: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    a = act.float().numpy().reshape(act.shape[0], act.shape[1], -1)
    # numpy's argmax: the first maximum (and the first NaN, NaN being the largest); the value is the one
    # at that position (of two zeros, the first one's sign)
    first = a.argmax(axis=2)
    return np.take_along_axis(a, first[..., None], 2)[..., 0], first


def maps(case: str, shape: tuple[int, int, int, int]) -> torch.Tensor:
    g = torch.Generator().manual_seed(hash(case) % 1000)
    if case == "zeros":  # dead channels: every position ties
        return torch.zeros(shape)
    if case == "signed zeros":  # -0.0 and 0.0 compare equal: the first of them is the maximum
        a = torch.zeros(shape)
        a[:, :, ::2] = -0.0
        return a
    if case == "few levels":
        return torch.randint(0, 3, shape, generator=g).float()
    if case == "relu":
        return torch.relu(torch.randn(shape, generator=g))
    if case == "negative":
        return -torch.randint(1, 4, shape, generator=g).float()
    if case == "minus inf":
        a = torch.full(shape, float("-inf"))
        a[0, 0, -1, -1] = 2.0
        return a
    if case == "nan":
        a = torch.randint(0, 2, shape, generator=g).float()
        flat = a.view(shape[0], shape[1], -1)
        flat[0, 1, 5] = flat[-1, 0, 3] = flat[-1, 0, 7] = float("nan")  # the first NaN is the maximum
        return a
    raise ValueError(case)


CASES = ["zeros", "signed zeros", "few levels", "relu", "negative", "minus inf", "nan"]
SHAPES = [(3, 5, 7, 9), (2, 17, 13, 13), (1, 4, 1, 1), (4, 3, 6, 2)]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_spatial_max_is_the_first_maximum(case, dtype, channels_last):
    for shape in SHAPES:
        if case == "nan" and (shape[1] < 2 or shape[2] * shape[3] < 8):
            continue
        act = maps(case, shape).to(dtype)
        if channels_last:
            act = act.contiguous(memory_format=torch.channels_last)
        values, pos = spatial_max(act)
        want_v, want_p = reference(act)
        assert values.dtype == torch.float32 and pos.dtype == torch.int64
        assert tuple(values.shape) == tuple(pos.shape) == shape[:2]
        np.testing.assert_array_equal(values.numpy(), want_v)  # NaN where NaN
        np.testing.assert_array_equal(pos.numpy(), want_p, err_msg=f"{case} {shape} {dtype} {channels_last}")
        np.testing.assert_array_equal(np.signbit(values.numpy()), np.signbit(want_v))  # -0.0 stays -0.0


def test_spatial_max_of_fully_connected_rows():
    x = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    values, pos = spatial_max(x)
    assert torch.equal(values, x) and not pos.any()
