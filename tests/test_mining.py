import numpy as np
import torch

from atlas.mining import Moments, TopK, spatial_max


def brute_topk(values, ids, k):
    """values (N, C): per channel, the k best by (value desc, id asc)."""
    out = []
    for c in range(values.shape[1]):
        order = sorted(range(len(ids)), key=lambda i: (-values[i, c], ids[i]))[:k]
        out.append([ids[i] for i in order])
    return np.array(out)


def test_topk_matches_brute_force_with_ties():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 5, size=(200, 7)).astype(np.float32)  # many ties
    ids = rng.permutation(1000)[:200]
    t = TopK(7, 6)
    for b in range(0, 200, 17):
        t.update(torch.from_numpy(values[b:b + 17]), torch.from_numpy(ids[b:b + 17]),
                 torch.zeros(len(ids[b:b + 17]), 7, dtype=torch.long))
    assert (t.ids.numpy() == brute_topk(values, ids, 6)).all()


def test_topk_merge_is_order_independent():
    rng = np.random.default_rng(1)
    values = rng.integers(0, 3, size=(120, 4)).astype(np.float32)
    ids = np.arange(120)

    def part(sl):
        t = TopK(4, 5)
        t.update(torch.from_numpy(values[sl]), torch.from_numpy(ids[sl]), torch.zeros(len(ids[sl]), 4, dtype=torch.long))
        return t

    a = part(slice(0, 120))
    b = part(slice(60, 120))
    b.merge(part(slice(0, 30)))
    b.merge(part(slice(30, 60)))
    assert torch.equal(a.ids, b.ids) and torch.equal(a.values, b.values)


def test_moments_match_numpy():
    rng = np.random.default_rng(2)
    v = np.maximum(rng.normal(size=(300, 5)), 0).astype(np.float32)
    m = Moments(5)
    m2 = Moments(5)
    m.update(torch.from_numpy(v[:100]))
    m2.update(torch.from_numpy(v[100:]))
    m.merge(m2)
    s = m.summary()
    assert np.allclose(s["mean"], v.mean(0), atol=1e-6)
    assert np.allclose(s["std"], v.std(0), atol=1e-6)
    assert np.allclose(s["max"], v.max(0))
    assert np.allclose(s["fire_rate"], (v > 0).mean(0))


def test_spatial_max_picks_first_position_in_row_major_order():
    a = torch.zeros(1, 1, 3, 4)
    a[0, 0, 1, 2] = 5
    a[0, 0, 2, 0] = 5
    v, p = spatial_max(a)
    assert v.item() == 5 and p.item() == 1 * 4 + 2


def test_spatial_max_is_the_same_in_any_layout_and_dtype():
    """The first maximum in row-major order, however the map is laid out (channels-last: the build's) and
    whether it is bf16 or float32: ties everywhere, so the position rule is what is tested."""
    import torch

    from atlas.mining import spatial_max

    a = torch.randint(0, 4, (8, 16, 13, 11), generator=torch.Generator().manual_seed(0)).float()
    ref_v, ref_p = a.flatten(2).max(dim=2)
    for x in (a, a.contiguous(memory_format=torch.channels_last), a.bfloat16(),
              a.bfloat16().contiguous(memory_format=torch.channels_last)):
        v, p = spatial_max(x)
        assert v.dtype == torch.float32 and torch.equal(v, ref_v) and torch.equal(p, ref_p)
