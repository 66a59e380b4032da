"""@triton.jit pieces shared by the sampling kernels (spec: `bild_kernels.reference`).

Random numbers come from the reference's Philox counters (triton's tl.random.philox is the same
Philox4x32-10, bit for bit). Passes over a vocabulary row walk it BLOCK_V logits at a time and keep
per-lane running maxima (argmax, first index on ties) and per-chunk rescaled sums (online logsumexp,
one exp per element). top-k/top-p never sort: the CUDA kernels' cut-off search (csrc/cut_search.h) over the
order-preserving int32 image of the float32 scaled logits finds the smallest kept value in a few histogram passes.
Scaling is `div_rn(z, t)` because the reference divides (correctly rounded), and the GPU's default
fp32 division is approximate: any other rounding could split ties differently from the reference.
"""
from __future__ import annotations

import triton
import triton.language as tl

from bild_kernels._backend import triton_interpret

_LOWEST_KEY = tl.constexpr(-2147483647)  # below the key of every float, -inf included


def stream_block(rows: int, n: int) -> tuple[int, int]:
    """(elements a program, warps) for a kernel that streams `rows` rows of n elements once (penalties, token
    bitmasks; host side). 2048 a program (8 bf16 per thread at 8 warps), narrower where that leaves fewer than ~2
    programs per SM of an H100/H200 (a batch of one row): the work is a stream, and idle SMs are lost bandwidth.
    Under the interpreter few, wide NumPy steps."""
    if triton_interpret():
        return min(triton.next_power_of_2(n), 16384), 4
    block = 2048
    while block > 256 and rows * triton.cdiv(n, block) < 264:
        block //= 2
    return min(block, triton.next_power_of_2(n)), 8 if block >= 2048 else 4


@triton.jit
def row_params(temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, offset_ptr, row, V):
    # One row's sampling parameters, and what they imply: greedy (T <= 0), the divisor t (1 when greedy),
    # and whether top-k/top-p/min-p filter anything.
    temp = tl.load(temperature_ptr + row)
    top_k = tl.load(top_k_ptr + row)
    top_p = tl.load(top_p_ptr + row)
    min_p = tl.load(min_p_ptr + row)
    seed = tl.load(seed_ptr + row)
    offset = tl.load(offset_ptr + row)
    greedy = temp <= 0.0
    t = tl.where(greedy, 1.0, temp)
    filtered = ((top_k > 0) & (top_k < V)) | (top_p < 1.0) | (min_p > 0.0)
    return top_k, top_p, min_p, seed, offset, greedy, t, filtered


@triton.jit
def uniform(seed, index, offset, PURPOSE: tl.constexpr, position):
    # Counter (index, offset_lo, offset_hi, purpose << 24 | position), first output word, as the reference.
    c1 = (offset & 0xFFFFFFFF).to(tl.uint32)
    c2 = ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c3 = (tl.full([], PURPOSE << 24, tl.int32) | position).to(tl.uint32)
    x, _, _, _ = tl.random.philox(seed, index.to(tl.uint32), c1, c2, c3)
    # (x >> 9) < 2**23, so (x >> 9) + 0.5 and its scaling by 2**-23 are exact in fp32, as in the reference.
    return ((x >> 9).to(tl.int32).to(tl.float32) + 0.5) * (1.0 / 8388608.0)


@triton.jit
def gumbel(seed, index, offset, PURPOSE: tl.constexpr, position):
    return -tl.log(-tl.log(uniform(seed, index, offset, PURPOSE, position)))


@triton.jit
def order_key(s):
    # int32 whose signed order is the float order; -0.0 maps onto +0.0 because they compare equal.
    bits = tl.where(s == 0.0, 0.0, s).to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def load_logits(row_ptr, offs, V):
    return tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)


@triton.jit
def lse_chunk(m, acc, x):
    # acc = sum exp(x_seen - m); -inf-only prefixes keep m = -inf and acc = 0 without NaNs.
    m_new = tl.maximum(m, tl.max(x, 0))
    safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, acc * tl.exp(m - safe) + tl.sum(tl.exp(x - safe), 0)


@triton.jit
def argmax_first(best, idx):
    # Lanes hold their earliest maximum; the smallest index among the lanes at the row maximum wins.
    m = tl.max(best, 0)
    return tl.min(tl.where(best == m, idx, 2147483647), 0)


@triton.jit
def row_pass(row_ptr, V, t, seed, offset, position, PURPOSE: tl.constexpr, SCALED: tl.constexpr,
             GUMBEL: tl.constexpr, BLOCK_V: tl.constexpr):
    """The one full pass: max/argmax/sum-exp of z, of s = z / t (SCALED) and argmax(s + gumbel) (GUMBEL).

    Returns (zmax, zidx, zsum, smax, ssum, gidx); sums are of exp(x - max). Without SCALED, s = z.
    """
    lanes = tl.arange(0, BLOCK_V)
    zm = float("-inf")
    zs = 0.0
    sm = float("-inf")
    ss = 0.0
    best = tl.full([BLOCK_V], float("-inf"), tl.float32)
    bidx = lanes
    gbest = tl.full([BLOCK_V], float("-inf"), tl.float32)
    gidx = lanes
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + lanes
        z = load_logits(row_ptr, offs, V)
        zm, zs = lse_chunk(zm, zs, z)
        upd = z > best
        best = tl.where(upd, z, best)
        bidx = tl.where(upd, offs, bidx)
        s = z
        if SCALED:
            s = tl.math.div_rn(z, t)
            sm, ss = lse_chunk(sm, ss, s)
        if GUMBEL:
            pert = s + gumbel(seed, offs, offset, PURPOSE, position)
            upd = pert > gbest
            gbest = tl.where(upd, pert, gbest)
            gidx = tl.where(upd, offs, gidx)
    if not SCALED:
        sm = zm
        ss = zs
    return zm, argmax_first(best, bidx), zs, sm, ss, argmax_first(gbest, gidx)


CUT_BUCKETS = tl.constexpr(1024)  # buckets of a cut-off search pass (csrc/cut_search.h)
_CUT_STEP = tl.constexpr(0.03125)  # the value pass's bucket: 1/32 nat
_CUT_UNIT = tl.constexpr(68719476736.0)  # 2^36: masses exp(s - s_max) <= 1 in fixed point; V < 2^24 keeps sums < 2^60


@triton.jit
def _value_lower(smax, j):
    # The lowest key of value bucket j: that of s_max - (j + 1) / 32 (the product is exact; one rounding).
    return order_key(smax - (j + 1).to(tl.float32) * _CUT_STEP).to(tl.int64)


@triton.jit
def filter_threshold(row_ptr, V, t, smax, ssum, top_k, top_p, min_p, hist_ptr, BLOCK_V: tl.constexpr):
    """Key of the smallest scaled logit that top-k, top-p and min-p all keep (_LOWEST_KEY when none is on).

    top-k keeps s >= the k-th largest value, i.e. keys up to the largest c with count(key >= c) >= k;
    top-p keeps s >= the largest value c with mass(key >= c) >= top_p * total; min-p keeps keys from
    c_m = key(smax + log(min_p)) up (condition "c <= c_m"). A token must pass each, so the answer is the largest
    of the cut-offs: the largest c where any condition holds. The search
    of the CUDA kernels (csrc/cut_search.h): a bracket [lo, hi) of keys narrowed by passes over the row, each a
    histogram of the bracket's keys over CUT_BUCKETS buckets (counts and fixed-point masses, summed by integer
    atomics into this program's hist_ptr[2, CUT_BUCKETS] of int64), then the first bucket from the top whose lower
    bound satisfies. The first pass buckets by value (1/32 nat each, 32 nats below the max), later ones split the
    bracket's keys evenly: at most 5 passes, usually 3. Ties at the cut-off are kept.
    """
    use_k = (top_k > 0) & (top_k < V)
    use_p = top_p < 1.0
    by_value = smax - smax == 0.0  # finite
    use_m = (min_p > 0.0) & by_value
    min_key = tl.where(use_m, order_key(smax + tl.log(tl.where(use_m, min_p, 1.0))).to(tl.int64), _LOWEST_KEY)
    lo = tl.full([], _LOWEST_KEY, tl.int64)
    hi = tl.where(use_k | use_p | use_m, order_key(smax).to(tl.int64) + 1, lo + 1)  # lo satisfies, hi does not
    target = (top_p * ssum * _CUT_UNIT).to(tl.int64)
    k64 = top_k.to(tl.int64)
    above_cnt = tl.zeros([], tl.int64)
    above_mass = tl.zeros([], tl.int64)
    idx = tl.arange(0, CUT_BUCKETS)
    lanes = tl.arange(0, BLOCK_V)
    while hi - lo > 1:
        tl.store(hist_ptr + idx, tl.zeros([CUT_BUCKETS], tl.int64))
        tl.store(hist_ptr + CUT_BUCKETS + idx, tl.zeros([CUT_BUCKETS], tl.int64))
        tl.debug_barrier()
        width = (hi - lo + CUT_BUCKETS - 1) // CUT_BUCKETS
        bottom = _value_lower(smax, tl.full([], CUT_BUCKETS - 1, tl.int32))
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + lanes
            s = tl.math.div_rn(load_logits(row_ptr, offs, V), t)
            key = order_key(s).to(tl.int64)
            inside = (offs < V) & (key >= lo) & (key < hi)
            if by_value:  # the first j with key >= lower(j), by bisection over the 1024 bounds
                inside = inside & (key >= bottom)
                a = tl.zeros([BLOCK_V], tl.int32)
                b = tl.full([BLOCK_V], CUT_BUCKETS - 1, tl.int32)
                for _ in tl.static_range(10):
                    mid = (a + b) >> 1
                    up = key >= _value_lower(smax, mid)
                    b = tl.where(up, mid, b)
                    a = tl.where(up, a, mid + 1)
                j = a
            else:
                j = ((hi - 1 - key) // width).to(tl.int32)
            j = tl.where(inside, j, 0)
            e = tl.exp(s - smax)
            tl.atomic_add(hist_ptr + j, tl.full([BLOCK_V], 1, tl.int64), mask=inside)
            tl.atomic_add(hist_ptr + CUT_BUCKETS + j, (e * _CUT_UNIT).to(tl.int64), mask=inside & (e > 0.0))
        tl.debug_barrier()
        cnt = tl.load(hist_ptr + idx, volatile=True)
        mass = tl.load(hist_ptr + CUT_BUCKETS + idx, volatile=True)
        ccum = tl.cumsum(cnt, 0)
        mcum = tl.cumsum(mass, 0)
        if by_value:
            lower = _value_lower(smax, idx)
        else:
            lower = tl.maximum(lo, hi - (idx + 1).to(tl.int64) * width)
        ok = (tl.where(use_k, above_cnt + ccum >= k64, False) | tl.where(use_p, above_mass + mcum >= target, False)
              | tl.where(use_m, lower <= min_key, False))
        first = tl.min(tl.where(ok, idx, CUT_BUCKETS), 0)
        if first < CUT_BUCKETS:
            c_excl = tl.sum(tl.where(idx < first, cnt, 0), 0)
            m_excl = tl.sum(tl.where(idx < first, mass, 0), 0)
            if by_value:
                new_lo = _value_lower(smax, first)
                new_hi = tl.where(first == 0, hi, _value_lower(smax, tl.maximum(first - 1, 0)))
            else:
                new_lo = tl.maximum(lo, hi - (first + 1).to(tl.int64) * width)
                new_hi = tl.where(first == 0, hi, tl.maximum(lo, hi - first.to(tl.int64) * width))
            above_cnt += c_excl
            above_mass += m_excl
            lo = new_lo
            hi = new_hi
        else:  # the cut-off lies below every bucket (a key pass's reach lo: then lo, never proven, stays)
            above_cnt += tl.sum(cnt, 0)
            above_mass += tl.sum(mass, 0)
            hi = tl.where(by_value, bottom, lo)
        by_value = False
        tl.debug_barrier()
    return lo.to(tl.int32)


@triton.jit
def kept_pass(row_ptr, V, t, smax, tau, seed, offset, position, PURPOSE: tl.constexpr, GUMBEL: tl.constexpr,
              BLOCK_V: tl.constexpr):
    """Over the kept set (key(s) >= tau): sum exp(s - smax) and argmax(s + gumbel) (GUMBEL)."""
    lanes = tl.arange(0, BLOCK_V)
    mass = tl.zeros([BLOCK_V], tl.float32)
    gbest = tl.full([BLOCK_V], float("-inf"), tl.float32)
    gidx = lanes
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + lanes
        s = tl.math.div_rn(load_logits(row_ptr, offs, V), t)
        keep = (order_key(s) >= tau) & (offs < V)
        mass += tl.where(keep, tl.exp(s - smax), 0.0)
        if GUMBEL:
            pert = tl.where(keep, s + gumbel(seed, offs, offset, PURPOSE, position), float("-inf"))
            upd = pert > gbest
            gbest = tl.where(upd, pert, gbest)
            gidx = tl.where(upd, offs, gidx)
    return tl.sum(mass, 0), argmax_first(gbest, gidx)
