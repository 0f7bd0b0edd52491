"""The stored switch codes' byte format (atlas/deconv/switches.py: two codes a byte, low nibble first,
when kernel*kernel <= 16; else one a byte): written out by hand for a few codes, so that an atlas stored
by an earlier release still decodes, and round trips of every length parity and kernel size."""
from __future__ import annotations

import numpy as np
import pytest

from atlas.deconv.switches import pack, unpack


def test_the_format_by_hand():
    assert pack(np.array([1, 2, 3], dtype=np.uint8), 3) == bytes([0x21, 0x03])  # the odd one pads with 0
    assert pack(np.array([[15, 0], [7, 9]], dtype=np.uint8), 4) == bytes([0x0F, 0x97])  # C order
    assert pack(np.array([24, 0, 17], dtype=np.uint8), 5) == bytes([24, 0, 17])  # 25 codes: a byte each
    assert unpack(bytes([0x21, 0x03]), 3, 3).tolist() == [1, 2, 3]
    assert unpack(bytes([0x0F, 0x97]), 4, 4).tolist() == [15, 0, 7, 9]


@pytest.mark.parametrize("kernel", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 1000, 1001])
def test_round_trip(kernel, n):
    rng = np.random.default_rng(kernel * 7919 + n)
    codes = rng.integers(0, kernel * kernel, size=n, dtype=np.uint8)
    data = pack(codes, kernel)
    assert len(data) == ((n + 1) // 2 if kernel * kernel <= 16 else n)
    assert np.array_equal(unpack(data, n, kernel), codes)


def test_a_crop_of_a_larger_array_packs_in_c_order():
    codes = np.arange(6 * 7 * 5, dtype=np.uint8).reshape(6, 7, 5) % 9
    crop = codes[1:5, 2:6, 1:4]  # not contiguous
    assert np.array_equal(unpack(pack(crop, 3), crop.size, 3), crop.reshape(-1))
