"""gather_paged_kv against its reference twin: exact dense copies, zero padding past each row's length."""
import pytest
import torch

from bild_kernels import ops
from bild_kernels import reference as R


def _case(context_lens, block_size, M, H, D, dtype, device):
    """Caches with random contents and tables filled by the reference reserve from a shuffled pool."""
    B = len(context_lens)
    num_blocks = max(B * M, 1)
    i32 = dict(dtype=torch.int32, device=device)
    block_tables = torch.full((B, M), -1, **i32)
    lens = torch.tensor(context_lens, **i32)
    R.reserve_paged_kv_ref(block_tables, torch.zeros(B, **i32), lens, torch.randperm(num_blocks, device=device).int(),
                           torch.tensor([num_blocks], **i32), block_size)
    key_cache = torch.randn(num_blocks, block_size, H, D, device=device).to(dtype)
    value_cache = torch.randn(num_blocks, block_size, H, D, device=device).to(dtype)
    return key_cache, value_cache, block_tables, lens


@pytest.mark.parametrize("context_lens, block_size, M", [
    ([1], 1, 1),
    ([0], 16, 2),  # L = 0: empty outputs
    ([5, 0, 17, 32, 1, 16, 31], 16, 2),  # rows with 0 tokens, block boundaries
    ([i % 9 for i in range(99)], 1, 9),
    ([3 * i % 37 for i in range(99)], 16, 3),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gather_paged_kv_matches_reference(backend_device, context_lens, block_size, M, dtype):
    backend, device = backend_device
    args = _case(context_lens, block_size, M, 3, 5, dtype, device)
    want_k, want_v = R.gather_paged_kv_ref(*args)
    k, v = ops.gather_paged_kv(*args, backend=backend)
    assert k.dtype == dtype and v.dtype == dtype
    assert torch.equal(k, want_k)
    assert torch.equal(v, want_v)


def test_gather_paged_kv_serving_head_shape(backend_device):
    backend, device = backend_device
    args = _case([4, 19], 16, 2, 8, 128, torch.bfloat16, device)
    want_k, want_v = R.gather_paged_kv_ref(*args)
    k, v = ops.gather_paged_kv(*args, backend=backend)
    assert torch.equal(k, want_k) and torch.equal(v, want_v)


@pytest.mark.parametrize("mutate, exc, name", [
    (lambda a: a.update(block_tables=a["block_tables"].long()), TypeError, "block_tables"),
    (lambda a: a.update(context_lens=a["context_lens"][:1]), ValueError, "context_lens"),
    (lambda a: a["context_lens"].__setitem__(0, 33), ValueError, "context_lens"),  # 2 blocks of 16
    (lambda a: a["context_lens"].__setitem__(0, -2), ValueError, "context_lens"),
    (lambda a: a.update(value_cache=a["value_cache"][:, :8]), ValueError, "value_cache"),
    (lambda a: a.update(key_cache=a["key_cache"].int()), TypeError, "key_cache"),
])
def test_gather_paged_kv_bad_input(backend_device, mutate, exc, name):
    backend, device = backend_device
    args = dict(zip(("key_cache", "value_cache", "block_tables", "context_lens"),
                    _case([4, 19], 16, 2, 2, 4, torch.float32, device)))
    mutate(args)
    with pytest.raises(exc, match=name):
        ops.gather_paged_kv(**args, backend=backend)
