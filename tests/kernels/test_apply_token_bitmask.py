"""apply_token_bitmask (Triton, CUDA and CPU twins) against its reference, bit for bit (it only selects), at odd sizes
(rows 1, 7, 99; V 111, 32000, 151936; 3-D [B, K+1, V] logits) in every logits dtype, with masks of every kind (random,
all set, all clear, sparse, dense, bits set past V) over logits that already hold -inf, -0.0, +inf and NaN; a row
worked out by hand; empty and non-contiguous inputs; pack / unpack round trips against NumPy's little-endian bit
order (xgrammar's layout); capture in a CUDA graph; and bad input."""
import numpy as np
import pytest
import torch

from bild_kernels import ops
from bild_kernels import reference as R

from ..conftest import HAS_GPU, kernel_backends, requires_gpu

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
DTYPES = [F32, F16, BF16, F64]
BITS = {F64: torch.int64, F32: torch.int32, F16: torch.int16, BF16: torch.int16}


# The op also has a "cpu" twin (bild_kernels._cpu, csrc/cpu_token_bitmask.cpp): every test runs it too.
@pytest.fixture(params=kernel_backends(cpu=True))
def backend_device(request):
    return request.param


def make_logits(shape, dtype, seed=0):
    """Random logits with -inf (1%), and a -0.0, a +inf and a NaN in every row (at tokens 1, 2, 3 where V allows)."""
    g = torch.Generator().manual_seed(seed + sum(shape))
    z = torch.randn(*shape, generator=g) * 4
    z[torch.rand(*shape, generator=g) < 0.01] = float("-inf")
    for t, x in ((1, -0.0), (2, float("inf")), (3, float("nan"))):
        if shape[-1] > t:
            z[..., t] = x
    return z.to(dtype)


def make_bitmask(shape, seed=0):
    """A bitmask for logits of `shape` [..., V] with rows of every kind, by row index modulo 6: random words, all set
    (every bit past V too), all clear, sparse (a few allowed tokens, as a grammar's mid-word mask), dense (a few banned
    ones), random with the bits past V set."""
    *lead, V = shape
    g = torch.Generator().manual_seed(seed + V + 7 * len(lead))
    allowed = torch.rand(*lead, V, generator=g) < 0.5
    flat = allowed.view(-1, V)
    kind = torch.arange(flat.shape[0]) % 6
    flat[kind == 1] = True
    flat[kind == 2] = False
    flat[kind == 3] = torch.rand(int((kind == 3).sum()), V, generator=g) < 0.01
    flat[kind == 4] = torch.rand(int((kind == 4).sum()), V, generator=g) < 0.99
    bitmask = R.pack_token_bitmask(allowed)
    spare = bitmask.shape[-1] * 32 - V  # the last word's bits past V
    if spare:
        past = -(1 << (32 - spare))  # the word's top `spare` bits, as an int32
        rows = bitmask.view(-1, bitmask.shape[-1])
        rows[(kind == 1) | (kind == 5), -1] |= past
    return bitmask


def run(backend, device, logits, bitmask):
    return ops.apply_token_bitmask(logits.to(device), bitmask.to(device), backend=backend).cpu()


def check(backend, device, logits, bitmask):
    want = R.apply_token_bitmask_ref(logits, bitmask)
    got = run(backend, device, logits, bitmask)
    assert got.dtype == logits.dtype and got.shape == logits.shape
    bits = BITS[logits.dtype]
    assert torch.equal(got.view(bits), want.view(bits))  # bit for bit: NaN, -0.0 and -inf included
    return got


# The interpreter (and the reference) stream every logit: the large vocabularies run with few rows.
@pytest.mark.parametrize("shape", [(1, 111), (7, 111), (99, 111), (7, 32000), (1, 151936), (2, 151936), (4, 5, 111),
                                   (2, 9, 32000), (1, 3, 151936), (3, 40), (6, 1)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_token_bitmask_matches_reference(backend_device, shape, dtype):
    backend, device = backend_device
    check(backend, device, make_logits(shape, dtype), make_bitmask(shape))


@pytest.mark.slow
@pytest.mark.parametrize("B, K1, V", [(64, 9, 128256), (256, 5, 32000)])
def test_apply_token_bitmask_matches_reference_at_serving_batches(backend_device, B, K1, V):
    backend, device = backend_device
    check(backend, device, make_logits((B, K1, V), BF16), make_bitmask((B, K1, V)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [111, 128, 32000])
def test_apply_token_bitmask_all_set_all_clear_and_bits_past_V(backend_device, dtype, V):
    """All set gives the logits back bit for bit, all clear gives all -inf (what a caller must avoid, not the op's to
    refuse), and the bits past V change nothing."""
    backend, device = backend_device
    z = make_logits((3, V), dtype)
    bits = BITS[dtype]
    W = (V + 31) // 32
    ones, zeros = torch.full((3, W), -1, dtype=torch.int32), torch.zeros(3, W, dtype=torch.int32)
    assert torch.equal(run(backend, device, z, ones).view(bits), z.view(bits))
    assert torch.isneginf(run(backend, device, z, zeros)).all()
    mask = make_bitmask((3, V), seed=5)
    mask[:, -1] &= (1 << (V % 32)) - 1 if V % 32 else -1  # the bits past V clear ...
    flipped = mask.clone()
    if V % 32:
        flipped[:, -1] |= -(1 << (V % 32))  # ... and set
    assert torch.equal(run(backend, device, z, mask).view(bits), run(backend, device, z, flipped).view(bits))
    check(backend, device, z, flipped)


def test_apply_token_bitmask_by_hand(backend_device):
    """V = 40: word 0 allows tokens 0, 2 and 31 (bit 31: the int32's sign), word 1 tokens 32-39 and bit 9 (token 41,
    past V: ignored); a second row allows token 39 only."""
    backend, device = backend_device
    z = torch.arange(80, dtype=F32).reshape(2, 40) - 20.0
    bitmask = torch.tensor([[(1 | 4 | 1 << 31) - (1 << 32), 0xFF | 1 << 9], [0, 1 << 7]], dtype=torch.int32)
    got = run(backend, device, z, bitmask)
    want = torch.full((2, 40), float("-inf"))
    for t in (0, 2, 31, *range(32, 40)):
        want[0, t] = z[0, t]
    want[1, 39] = z[1, 39]
    assert torch.equal(got, want)
    assert torch.equal(got, R.apply_token_bitmask_ref(z, bitmask))


def test_apply_token_bitmask_returns_a_new_tensor(backend_device):
    backend, device = backend_device
    z = make_logits((4, 111), BF16).to(device)
    before = z.clone()
    out = ops.apply_token_bitmask(z, make_bitmask((4, 111)).to(device), backend=backend)
    assert out.data_ptr() != z.data_ptr() and out.device == z.device
    assert torch.equal(z.view(torch.int16), before.view(torch.int16))


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_apply_token_bitmask_non_contiguous_and_empty(backend_device, dtype):
    backend, device = backend_device
    z = make_logits((6, 2, 300), dtype)[:, 1, :257]  # strided rows, V = 257
    g = torch.Generator().manual_seed(1)
    mask = torch.randint(-2**31, 2**31, (6, 2 * 9), generator=g).to(torch.int32)[:, 1::2]  # 9 = ceil(257 / 32)
    assert not z.is_contiguous() and not mask.is_contiguous()
    check(backend, device, z, mask)
    check(backend, device, make_logits((3, 5, 111), dtype)[:, ::2], make_bitmask((3, 5, 111))[:, ::2])
    for shape in [(0, 111), (2, 0, 33)]:
        got = run(backend, device, torch.zeros(shape, dtype=dtype), torch.zeros(*shape[:-1], (shape[-1] + 31) // 32,
                                                                                dtype=torch.int32))
        assert got.shape == shape and got.dtype == dtype


@pytest.mark.parametrize("V", [1, 31, 32, 33, 111, 32000])
@pytest.mark.parametrize("lead", [(), (3,), (2, 5)])
def test_pack_and_unpack_round_trip(V, lead):
    g = torch.Generator().manual_seed(V + len(lead))
    allowed = torch.rand(*lead, V, generator=g) < 0.5
    bitmask = R.pack_token_bitmask(allowed)
    W = (V + 31) // 32
    assert bitmask.dtype == torch.int32 and bitmask.shape == (*lead, W)
    assert torch.equal(R.unpack_token_bitmask(bitmask, V), allowed)
    # NumPy's little-endian bit order, four bytes a little-endian int32 word: xgrammar's layout
    padded = np.zeros((*lead, W * 32), dtype=bool)
    padded[..., :V] = allowed.numpy()
    want = np.packbits(padded, axis=-1, bitorder="little").view("<i4")
    assert np.array_equal(bitmask.numpy(), want)
    # unpack drops the bits past V; pack writes them clear
    words = torch.randint(-2**31, 2**31, (*lead, W), generator=g, dtype=torch.int64).to(torch.int32)
    again = R.pack_token_bitmask(R.unpack_token_bitmask(words, V))
    keep = -1 if V % 32 == 0 else (1 << (V % 32)) - 1
    assert torch.equal(again[..., :-1], words[..., :-1]) and torch.equal(again[..., -1], words[..., -1] & keep)


def test_pack_sets_the_sign_bit_for_token_31():
    allowed = torch.zeros(33, dtype=torch.bool)
    allowed[31] = allowed[32] = True
    assert R.pack_token_bitmask(allowed).tolist() == [-2**31, 1]
    assert R.pack_token_bitmask(torch.ones(64, dtype=torch.bool)).tolist() == [-1, -1]


def test_default_backend_runs_on_the_cpu():
    z, mask = make_logits((3, 111), F32), make_bitmask((3, 111))
    assert torch.equal(ops.apply_token_bitmask(z, mask).view(torch.int32),
                       R.apply_token_bitmask_ref(z, mask).view(torch.int32))


def test_cpu_op_passes_opcheck_and_traces_through_torch_compile():
    # (the Triton op's: test_custom_ops; the CUDA op's: test_cuda_extension)
    from bild_kernels._backend import cpu_extension
    if cpu_extension() is None:
        pytest.skip("bild_kernels._cpu was not built or needs AVX2/FMA")
    op = torch.ops.bild_kernels_cpu.apply_token_bitmask
    z, mask = torch.randn(3, 4, 77), R.pack_token_bitmask(torch.rand(3, 4, 77) < 0.5)  # (no row all -inf: NaN)
    torch.library.opcheck(op.default, (z, mask), test_utils=("test_schema", "test_faketensor"))

    def step(z, mask):
        return op(z, mask).softmax(-1)

    assert torch.equal(step(z, mask), torch.compile(step, fullgraph=True, backend="eager")(z, mask))


@requires_gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_apply_token_bitmask_captures_in_a_cuda_graph(backend):
    # No host reads in the launch: a captured op replays with a new mask read from the same buffer.
    from bild_kernels._backend import cuda_extension
    if backend == "cuda" and cuda_extension() is None:
        pytest.skip("bild_kernels._C was not built")
    shape = (8, 5, 32000)
    logits, bitmask = make_logits(shape, BF16).cuda(), make_bitmask(shape).cuda()
    ops.apply_token_bitmask(logits, bitmask, backend=backend)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.apply_token_bitmask(logits, bitmask, backend=backend)
    bitmask.copy_(make_bitmask(shape, seed=9))
    graph.replay()
    assert torch.equal(out.view(torch.int16), R.apply_token_bitmask_ref(logits, bitmask).view(torch.int16))


def _bad_cases():
    z = torch.zeros(2, 3, 40)
    m = torch.zeros(2, 3, 2, dtype=torch.int32)
    return [
        (dict(logits=z.int()), TypeError, "logits"),
        (dict(logits=z.bool()), TypeError, "logits"),
        (dict(logits=[[0.0]]), TypeError, "logits"),
        (dict(logits=torch.tensor(1.0), bitmask=torch.tensor(1, dtype=torch.int32)), ValueError, "logits"),
        (dict(logits=torch.zeros(2, 3, 0), bitmask=torch.zeros(2, 3, 0, dtype=torch.int32)), ValueError, "logits"),
        (dict(bitmask=m.long()), TypeError, "bitmask"),
        (dict(bitmask=m.to(torch.uint32)), TypeError, "bitmask"),
        (dict(bitmask=m.float()), TypeError, "bitmask"),
        (dict(bitmask=m.bool()), TypeError, "bitmask"),
        (dict(bitmask=m.tolist()), TypeError, "bitmask"),
        (dict(bitmask=torch.zeros(2, 3, 3, dtype=torch.int32)), ValueError, "bitmask must hold ceil"),
        (dict(bitmask=torch.zeros(2, 3, 1, dtype=torch.int32)), ValueError, "bitmask must hold ceil"),
        (dict(bitmask=torch.zeros(2, 4, 2, dtype=torch.int32)), ValueError, "bitmask must have the logits' leading"),
        (dict(bitmask=torch.zeros(6, 2, dtype=torch.int32)), ValueError, "bitmask must have the logits' leading"),
        (dict(bitmask=torch.zeros(1, 2, 3, 2, dtype=torch.int32)), ValueError, "bitmask must have the logits' lead"),
        (dict(bitmask=torch.zeros(2, dtype=torch.int32)), ValueError, "bitmask"),
        (dict(bitmask=m.to("meta")), ValueError, "bitmask is on meta"),
        (dict(backend="tpu"), ValueError, "backend"),
    ]


@pytest.mark.parametrize("kwargs, exc, name", _bad_cases())
def test_apply_token_bitmask_bad_input(kwargs, exc, name):
    a = dict(logits=torch.zeros(2, 3, 40), bitmask=torch.zeros(2, 3, 2, dtype=torch.int32), backend="ref")
    a.update(kwargs)
    with pytest.raises(exc, match=name):
        ops.apply_token_bitmask(a.pop("logits"), a.pop("bitmask"), **a)


@pytest.mark.skipif(HAS_GPU, reason="checks the error of a CUDA op on CPU tensors")
def test_apply_token_bitmask_cuda_backend_on_cpu_tensors_fails_clearly():
    with pytest.raises(ValueError, match="backend 'cuda' .*apply_token_bitmask"):
        ops.apply_token_bitmask(torch.zeros(1, 5), torch.zeros(1, 1, dtype=torch.int32), backend="cuda")
