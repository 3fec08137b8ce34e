"""Random draws that are a pure function of (seed, epoch, sample index, draw slot).

A training sample's augmentation and mixing must not depend on how samples are grouped
(one batch, a chunk of many batches, one process's share of a batch), on the device, or on
what was drawn before. So no generator state is kept: every random number is a hash of its
coordinates ("counter-based" generation, as Philox does it), computed for a whole tensor of
sample indices with a few elementwise integer operations, whatever their number.

How a draw is made: (seed, epoch, stream) are folded on the host into two 32-bit keys; a
sample's index is hashed with the first key into a 32-bit state; draw slot s of that sample
is the hash of (state + s * golden) xor the second key, as SplitMix steps a Weyl sequence
and finalizes each step. Streams keep the augmentation's and the mixing's draws apart.

The hash is lowbias32 (C. Wellons, "hash-prospector"): xor-shifts and two multiplications
by odd constants mod 2^32, a bijection of [0, 2^32) with near-ideal avalanche. It runs in
int64 arithmetic that never overflows: values stay below 2^32, and a multiplier at or above
2^31 is replaced by its negative twin (c - 2^32, the same number mod 2^32), so every product
lies within +-2^63; the `& (2^32 - 1)` that follows is two's-complement exact for negative
products too. Shifts only ever see non-negative values. The same function therefore gives
the same bits on any device, in any batch shape, and on Python ints (the host side).
"""
import functools
import math

import torch

MASK32 = 0xFFFF_FFFF
_GOLDEN32 = 0x9E37_79B9  # 2^32 / golden ratio: the Weyl step between a sample's slots

# Streams: which consumer the draws belong to.
AUGMENT_STREAM = 1
MIX_STREAM = 2


def _mul32(x, constant: int):
    """x * constant mod 2^32 for x in [0, 2^32), without leaving int64."""
    if constant >= 2**31:
        constant -= 2**32
    return (x * constant) & MASK32


def hash32(x):
    """lowbias32 of x in [0, 2^32): an int64 tensor (elementwise) or a Python int."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB_352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846C_A68B)
    return x ^ (x >> 16)


def stream_keys(seed: int, epoch: int, stream: int) -> tuple[int, int]:
    """Two 32-bit keys for all draws of one stream in one epoch (host integers)."""
    if epoch < 0 or stream < 0:
        raise ValueError(f"epoch and stream must be non-negative, got epoch={epoch}, stream={stream}")
    seed %= 2**64  # any Python int; negative seeds are valid too
    key = 0
    for word in (seed & MASK32, seed >> 32, epoch & MASK32, epoch >> 32, stream):
        key = hash32(key ^ word)
    return key, hash32(key ^ _GOLDEN32)


@functools.lru_cache(maxsize=None)
def _slot_offsets(num_slots: int, device: torch.device) -> torch.Tensor:
    """int64 [num_slots]: s * golden mod 2^32, built once per device (no host copy per call)."""
    return (torch.arange(num_slots, device=device) * _GOLDEN32) & MASK32


def random_bits(indices: torch.Tensor, num_slots: int, keys: tuple[int, int]) -> torch.Tensor:
    """int64 [N, num_slots], uniform on [0, 2^32): the draws of each sample index (int64 [N],
    0 <= index < 2^32) in each slot, keyed by stream_keys(...). Row i depends on indices[i]
    and the keys alone."""
    first_key, second_key = keys
    state = hash32((indices & MASK32) ^ first_key)
    steps = (state.unsqueeze(1) + _slot_offsets(num_slots, indices.device)) & MASK32
    return hash32(steps ^ second_key)


# ---------------------------------------------------------------------------------------
# Uniform draws from 32-bit ones

def below(bits: torch.Tensor, n: int) -> torch.Tensor:
    """int64 uniform on 0..n-1 (n < 2^31): floor(bits * n / 2^32). Each value takes
    floor or ceil of 2^32 / n of the 2^32 inputs, a relative bias under n / 2^32."""
    return (bits * n) >> 32


def coin(bits: torch.Tensor) -> torch.Tensor:
    """bool, exactly probability 1/2: the top bit."""
    return bits >= 2**31


def uniform_float32(bits: torch.Tensor) -> torch.Tensor:
    """float32 uniform on [0, 1) in steps of 2^-24 (what torch.rand gives a float32):
    the top 24 bits, exactly representable."""
    return (bits >> 8).to(torch.float32).mul_(2.0**-24)


def uniform_open_float64(bits: torch.Tensor) -> torch.Tensor:
    """float64 uniform on the open interval (0, 1): (bits + 1/2) / 2^32, so logarithms are
    finite."""
    return (bits.to(torch.float64) + 0.5).mul_(2.0**-32)


# ---------------------------------------------------------------------------------------
# Gamma and Beta draws with a fixed number of uniforms

GAMMA_TRIES = 8  # Marsaglia-Tsang proposals per draw: all rejected with probability < 0.049^8 < 4e-11
GAMMA_SLOTS = 3 * GAMMA_TRIES + 1  # per try: two uniforms for a normal, one to accept; one to boost


def log_gamma_variate(shape: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """float64 [N]: log of a Gamma(shape, 1) draw per row, from bits int64 [N, GAMMA_SLOTS].

    Marsaglia and Tsang (2000): for shape a >= 1, with d = a - 1/3 and c = 1 / sqrt(9 d),
    propose v = (1 + c z)^3 from a standard normal z (Box-Muller) and accept d v when
    log u < z^2 / 2 + d - d v + d log v. Every row runs GAMMA_TRIES proposals at once and keeps
    the first accepted one (acceptance is at least 0.95 per proposal, so all fail with
    probability below 4e-11; such a row takes d, the distribution's center). Shapes below 1
    draw Gamma(a + 1) and multiply by u^(1/a) (in logs, so tiny shapes do not underflow).
    """
    shape = shape.to(torch.float64)
    boosted = shape < 1
    d = torch.where(boosted, shape + 1, shape) - 1.0 / 3.0
    c = torch.rsqrt(9.0 * d)
    u = uniform_open_float64(bits)
    radius, angle, accept_u = u[:, 0:GAMMA_TRIES], u[:, GAMMA_TRIES:2 * GAMMA_TRIES], u[:, 2 * GAMMA_TRIES:3 * GAMMA_TRIES]
    z = torch.sqrt(-2.0 * torch.log(radius)) * torch.cos((2.0 * math.pi) * angle)
    v = (1.0 + c.unsqueeze(1) * z) ** 3
    d_ = d.unsqueeze(1)
    log_v = torch.log(v.clamp(min=torch.finfo(torch.float64).tiny))
    accepted = (v > 0) & (torch.log(accept_u) < 0.5 * z * z + d_ - d_ * v + d_ * log_v)
    first = accepted.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first True (0 if none)
    log_d = torch.log(d)
    log_value = torch.where(accepted.any(dim=1), log_d + log_v.gather(1, first).squeeze(1), log_d)
    boost = torch.log(u[:, 3 * GAMMA_TRIES]) / shape
    return torch.where(boosted, log_value + boost, log_value)


BETA_SLOTS = 2 * GAMMA_SLOTS


def symmetric_beta(alpha: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """float64 [N]: a Beta(alpha, alpha) draw per row (alpha > 0, per row), from bits int64
    [N, BETA_SLOTS]: X / (X + Y) for X, Y ~ Gamma(alpha), computed from their logarithms.
    Both gammas of all rows are drawn in one pass. The logistic function is written out:
    torch.sigmoid's vectorized and scalar CPU loops round differently, so a row's draw would
    depend on where the row falls in the tensor (and on the number of threads)."""
    shapes = alpha.unsqueeze(1).expand(-1, 2).reshape(-1)
    log_gammas = log_gamma_variate(shapes, bits.reshape(-1, GAMMA_SLOTS)).view(-1, 2)
    return 1.0 / (1.0 + torch.exp(log_gammas[:, 1] - log_gammas[:, 0]))
