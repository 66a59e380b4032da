"""The Triton ops are real torch custom ops: their fake implementations agree with the kernels
(torch.library.opcheck), and they trace through torch.compile with fullgraph=True."""
import pytest
import torch

import bild_kernels  # noqa: F401  (registers the ops)
from bild_kernels.reference import MODE_BILD, MODE_SAMPLE

pytestmark = pytest.mark.usefixtures("backend_device")


def _triton_device(backend_device):
    backend, device = backend_device
    if backend != "triton":
        pytest.skip("custom-op checks here cover the Triton ops; the CUDA ops are checked in test_cuda_extension")
    from bild_kernels._backend import _load_backends
    _load_backends()
    return device


def _verify_args(device, mode):
    B, K, V = 3, 4, 37
    logits = torch.randn(B, K + 1, V, device=device)
    draft = torch.randint(0, V, (B, K), device=device)
    draft[1, 2:] = -1
    probs = torch.softmax(torch.randn(B, K, V, device=device), -1) if mode == MODE_SAMPLE else None
    f = lambda x: torch.full((B,), x, device=device)  # noqa: E731
    return (draft, logits, mode, f(1.0), probs, f(0.7), torch.full((B,), 5, dtype=torch.int32, device=device),
            f(0.9), torch.arange(B, device=device), torch.zeros(B, dtype=torch.int64, device=device))


def _sample_args(device):
    B, V = 5, 53
    f = lambda x: torch.full((B,), x, device=device)  # noqa: E731
    return (torch.randn(B, V, device=device), f(0.8), torch.full((B,), 7, dtype=torch.int32, device=device), f(0.95),
            torch.arange(B, device=device), torch.arange(B, device=device) * 3, f(0.2))


@pytest.mark.parametrize("mode", [MODE_BILD, MODE_SAMPLE])
def test_opcheck_verify_draft(backend_device, mode):
    device = _triton_device(backend_device)
    torch.library.opcheck(torch.ops.bild_kernels.verify_draft_triton.default, _verify_args(device, mode),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("op", ["sample_draft", "apply_penalties", "apply_token_bitmask"])
def test_opcheck_row_ops(backend_device, op):
    device = _triton_device(backend_device)
    args = {"sample_draft": _sample_args, "apply_penalties": _penalties_args,
            "apply_token_bitmask": _bitmask_args}[op](device)
    torch.library.opcheck(getattr(torch.ops.bild_kernels, f"{op}_triton").default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_opcheck_paged_kv(backend_device):
    device = _triton_device(backend_device)
    T, H, D, nb, bs = 5, 2, 8, 6, 4
    key, value = torch.randn(T, H, D, device=device), torch.randn(T, H, D, device=device)
    kc, vc = torch.zeros(nb, bs, H, D, device=device), torch.zeros(nb, bs, H, D, device=device)
    slots = torch.tensor([0, 5, -1, 9, 23], device=device)
    torch.library.opcheck(torch.ops.bild_kernels.write_paged_kv_triton.default, (key, value, kc, vc, slots),
                          test_utils=("test_schema", "test_faketensor"))
    tables = torch.full((2, 3), -1, dtype=torch.int32, device=device)
    lens = torch.tensor([0, 0], dtype=torch.int32, device=device)
    free = torch.arange(nb, dtype=torch.int32, device=device)
    nfree = torch.tensor([nb], dtype=torch.int32, device=device)
    n = torch.tensor([5, 3], dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.bild_kernels.reserve_paged_kv_triton.default, (tables, lens, n, free, nfree, bs),
                          test_utils=("test_schema", "test_faketensor"))


def _penalties_args(device):
    B, P, V = 3, 4, 29
    f = lambda x, dt=torch.float64: torch.full((B,), x, dtype=dt, device=device)  # noqa: E731
    return (torch.randn(B, P, V, device=device), torch.tensor([[1, 2, 2, -1, 5]] * B, device=device),
            f(2, torch.int32), torch.tensor([[5, -1, 7]] * B, device=device), f(1.3), f(0.5), f(0.25),
            f(4, torch.int32), torch.tensor([[0, 28]] * B, device=device), torch.tensor([[3, -1]] * B, device=device),
            torch.tensor([[1.5, 0.0]] * B, dtype=torch.float64, device=device))


def test_apply_penalties_traces_through_torch_compile(backend_device):
    device = _triton_device(backend_device)
    args = _penalties_args(device)

    def step(args):
        return torch.ops.bild_kernels.apply_penalties_triton(*args).float().softmax(-1)

    eager = step(args)
    assert torch.equal(eager, torch.compile(step, fullgraph=True, backend="eager")(args))


def _bitmask_args(device):
    B, P, V = 3, 4, 77  # [B, K+1, V] logits, ceil(77 / 32) = 3 words a row
    words = torch.randint(-2**31, 2**31, (B, P, 3), generator=torch.Generator().manual_seed(0))
    return torch.randn(B, P, V, device=device), words.to(torch.int32).to(device)


def test_apply_token_bitmask_traces_through_torch_compile(backend_device):
    device = _triton_device(backend_device)
    args = _bitmask_args(device)

    def step(logits, bitmask):
        return torch.ops.bild_kernels.apply_token_bitmask_triton(logits, bitmask).softmax(-1)

    eager = step(*args)
    assert torch.equal(eager, torch.compile(step, fullgraph=True, backend="eager")(*args))


def test_verify_and_sample_trace_through_torch_compile(backend_device):
    device = _triton_device(backend_device)
    vargs, sargs = _verify_args(device, MODE_BILD), _sample_args(device)

    def step(vargs, sargs):
        na, out, dist, conf = torch.ops.bild_kernels.verify_draft_triton(*vargs)
        tok, p, pmax, energy, fb = torch.ops.bild_kernels.sample_draft_triton(*sargs)
        return na + 1, out, dist.sum(), tok, energy * 2

    eager = step(vargs, sargs)
    compiled = torch.compile(step, fullgraph=True, backend="eager")(vargs, sargs)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
