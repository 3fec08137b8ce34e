"""vit.keyed_random: draws that are a function of (seed, epoch, index, slot) alone, with the
distributions they claim."""
import math

import numpy as np
import pytest
import torch

from vit import keyed_random as kr

KEYS = kr.stream_keys(seed=0, epoch=0, stream=kr.AUGMENT_STREAM)


def lowbias32_numpy(x: np.ndarray) -> np.ndarray:
    """The published lowbias32 in uint32 arithmetic, which wraps mod 2^32 by definition."""
    x = x.astype(np.uint32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def chi_square_p_value(counts: torch.Tensor, expected) -> float:
    statistic = ((counts.double() - expected) ** 2 / expected).sum()
    degrees_of_freedom = counts.numel() - 1
    return torch.special.gammaincc(torch.tensor(degrees_of_freedom / 2, dtype=torch.float64), statistic / 2).item()


def test_hash_is_lowbias32_on_tensors_and_python_ints():
    values = np.random.default_rng(0).integers(0, 2**32, 10_000, dtype=np.uint64)
    values[:4] = [0, 1, 2**31, 2**32 - 1]  # the extremes of the multiplications and shifts
    expected = lowbias32_numpy(values).astype(np.int64)
    assert np.array_equal(kr.hash32(torch.from_numpy(values.astype(np.int64))).numpy(), expected)
    assert [kr.hash32(int(v)) for v in values[:50]] == expected[:50].tolist()


def test_stream_keys_separate_seeds_epochs_and_streams():
    keys = {kr.stream_keys(seed, epoch, stream) for seed in (0, 1, -1, 2**40) for epoch in (0, 1, 199)
            for stream in (kr.AUGMENT_STREAM, kr.MIX_STREAM)}
    assert len(keys) == 4 * 3 * 2
    assert all(0 <= k < 2**32 for pair in keys for k in pair)
    with pytest.raises(ValueError, match="non-negative"):
        kr.stream_keys(0, -1, kr.AUGMENT_STREAM)


def test_each_row_depends_on_its_index_alone():
    indices = torch.tensor([7, 49_999, 0, 123, 2**32 - 1, 5])
    bits = kr.random_bits(indices, 6, KEYS)
    assert bits.shape == (6, 6) and bits.dtype == torch.int64
    assert bits.min() >= 0 and bits.max() < 2**32
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    assert torch.equal(kr.random_bits(indices[order], 6, KEYS), bits[order])
    assert torch.equal(kr.random_bits(indices[2:4], 6, KEYS), bits[2:4])
    # More slots extend the rows without changing the first ones.
    assert torch.equal(kr.random_bits(indices, 9, KEYS)[:, :6], bits)
    assert not torch.equal(kr.random_bits(indices, 6, kr.stream_keys(0, 1, kr.AUGMENT_STREAM)), bits)


def test_draws_are_uniform_and_independent_across_slots_and_neighbours():
    n = 200_000
    bits = kr.random_bits(torch.arange(n), 3, KEYS)
    for slot in range(3):
        for buckets in (9, 25):
            counts = torch.bincount(kr.below(bits[:, slot], buckets), minlength=buckets)
            assert chi_square_p_value(counts, n / buckets) > 1e-4, (slot, buckets)
    # Joint uniformity: two slots of one sample, and one slot of neighbouring samples.
    nine = kr.below(bits, 9)
    for first, second in ((nine[:, 0], nine[:, 1]), (nine[:, 1], nine[:, 2]), (nine[:-1, 0], nine[1:, 0])):
        counts = torch.bincount(first * 9 + second, minlength=81)
        assert chi_square_p_value(counts, len(first) / 81) > 1e-4
    top_bits = torch.bincount(bits[:, 0] >> 28, minlength=16)  # the high bits, which coin and below use
    assert chi_square_p_value(top_bits, n / 16) > 1e-4


def test_uniform_conversions_hit_their_ranges_exactly():
    edges = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1])
    assert kr.below(edges, 9).tolist() == [0, 0, 4, 4, 8]
    assert kr.coin(edges).tolist() == [False, False, False, True, True]
    u = kr.uniform_float32(edges)
    assert u.dtype == torch.float32 and u[0] == 0 and u[-1] == 1 - 2**-24
    assert torch.equal(u * 2**24, (edges >> 8).float())  # multiples of 2^-24, exact
    open_u = kr.uniform_open_float64(edges)
    assert open_u.dtype == torch.float64 and 0 < open_u.min() and open_u.max() < 1


def kolmogorov_smirnov(a: np.ndarray, b: np.ndarray) -> float:
    grid = np.sort(np.concatenate([a, b]))
    return float(np.abs(np.searchsorted(np.sort(a), grid, side="right") / len(a)
                        - np.searchsorted(np.sort(b), grid, side="right") / len(b)).max())


@pytest.mark.parametrize("alpha", [0.2, 0.8, 1.0, 3.0])
def test_symmetric_beta_matches_numpy(alpha):
    n = 100_000
    bits = kr.random_bits(torch.arange(n), kr.BETA_SLOTS, kr.stream_keys(1, 2, kr.MIX_STREAM))
    lam = kr.symmetric_beta(torch.full((n,), alpha), bits).numpy()
    assert np.isfinite(lam).all() and (lam >= 0).all() and (lam <= 1).all()
    # numpy's sampler as the reference (torch's float32 Beta sampler is itself off at small
    # alpha); two-sample Kolmogorov-Smirnov at the 0.1% level: c(0.001) * sqrt(2 / n).
    reference = np.random.default_rng(3).beta(alpha, alpha, n)
    assert kolmogorov_smirnov(lam, reference) < 1.95 * math.sqrt(2 / n), alpha
    assert abs(lam.var() - 1 / (4 * (2 * alpha + 1))) < 0.01


def test_symmetric_beta_takes_a_shape_per_row():
    n = 50_000
    bits = kr.random_bits(torch.arange(n), kr.BETA_SLOTS, KEYS)
    mixed = kr.symmetric_beta(torch.tensor([0.3, 4.0]).repeat(n // 2), bits)
    alone = [kr.symmetric_beta(torch.full((n // 2,), alpha), bits[i::2]) for i, alpha in enumerate((0.3, 4.0))]
    assert torch.equal(mixed[0::2], alone[0]) and torch.equal(mixed[1::2], alone[1])
