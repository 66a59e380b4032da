"""write_paged_kv against its reference twin: exact cache contents, padding rows, dtype casts, bad input."""
import pytest
import torch

from bild_kernels import ops
from bild_kernels import reference as R

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _case(T, H, D, num_blocks, block_size, kv_dtype, cache_dtype, device, num_pad=0):
    key = torch.randn(T, H, D, device=device).to(kv_dtype)
    value = torch.randn(T, H, D, device=device).to(kv_dtype)
    key_cache = torch.randn(num_blocks, block_size, H, D, device=device).to(cache_dtype)
    value_cache = torch.randn(num_blocks, block_size, H, D, device=device).to(cache_dtype)
    slot_mapping = torch.randperm(num_blocks * block_size, device=device)[:T]
    slot_mapping[torch.randperm(T, device=device)[:num_pad]] = -1
    return key, value, key_cache, value_cache, slot_mapping


def _check(backend, key, value, key_cache, value_cache, slot_mapping):
    want_k, want_v = key_cache.clone(), value_cache.clone()
    R.write_paged_kv_ref(key, value, want_k, want_v, slot_mapping)
    ops.write_paged_kv(key, value, key_cache, value_cache, slot_mapping, backend=backend)
    assert torch.equal(key_cache, want_k)
    assert torch.equal(value_cache, want_v)


@pytest.mark.parametrize("T, H, D, num_blocks, block_size, num_pad", [
    (1, 1, 1, 1, 1, 0),
    (7, 3, 5, 4, 16, 2),  # odd heads and head dim, padding rows
    (99, 2, 64, 13, 16, 10),
    (33, 8, 128, 40, 1, 33),  # block size 1; every row padding
])
@pytest.mark.parametrize("kv_dtype, cache_dtype", [(F32, F32), (BF16, BF16), (F16, F16), (F32, BF16), (BF16, F32),
                                                   (F16, F32)])
def test_write_paged_kv_matches_reference(backend_device, T, H, D, num_blocks, block_size, num_pad, kv_dtype,
                                          cache_dtype):
    backend, device = backend_device
    _check(backend, *_case(T, H, D, num_blocks, block_size, kv_dtype, cache_dtype, device, num_pad))


def test_write_paged_kv_strided_key(backend_device):
    # K and V are usually column slices of one fused QKV projection: token stride != H * D.
    backend, device = backend_device
    T, H, D = 9, 2, 8
    qkv = torch.randn(T, 3 * H, D, device=device)
    key, value = qkv[:, H:2 * H], qkv[:, 2 * H:]
    _, _, key_cache, value_cache, slot_mapping = _case(T, H, D, 5, 4, F32, F32, device, num_pad=1)
    _check(backend, key, value, key_cache, value_cache, slot_mapping)


def test_write_paged_kv_int32_slots_and_empty(backend_device):
    backend, device = backend_device
    key, value, key_cache, value_cache, slot_mapping = _case(6, 2, 4, 3, 4, F32, F32, device, num_pad=1)
    _check(backend, key, value, key_cache, value_cache, slot_mapping.int())
    before = key_cache.clone()
    ops.write_paged_kv(key[:0], value[:0], key_cache, value_cache, slot_mapping[:0], backend=backend)
    assert torch.equal(key_cache, before)


@pytest.mark.parametrize("mutate, exc, name", [
    (lambda a: a.update(slot_mapping=a["slot_mapping"].float()), TypeError, "slot_mapping"),
    (lambda a: a.update(key=a["key"].int()), TypeError, "key"),
    (lambda a: a.update(value=a["value"][:, :1]), ValueError, "value"),
    (lambda a: a.update(slot_mapping=a["slot_mapping"][:-1]), ValueError, "slot_mapping"),
    (lambda a: a["slot_mapping"].__setitem__(0, 12), ValueError, "slot_mapping"),  # 3 blocks * 4 slots
    (lambda a: a["slot_mapping"].__setitem__(0, -2), ValueError, "slot_mapping"),
    (lambda a: a.update(value_cache=a["value_cache"].half()), TypeError, "value_cache"),
    (lambda a: a.update(key_cache=a["key_cache"][:, :, :1]), ValueError, "key_cache"),
    (lambda a: a.update(slot_mapping=a["slot_mapping"].to("meta")), ValueError, "slot_mapping"),
])
def test_write_paged_kv_bad_input(backend_device, mutate, exc, name):
    backend, device = backend_device
    args = dict(zip(("key", "value", "key_cache", "value_cache", "slot_mapping"),
                    _case(6, 2, 4, 3, 4, F32, F32, device, num_pad=1)))
    originals = {k: (args[k], args[k].clone()) for k in ("key_cache", "value_cache")}
    mutate(args)
    with pytest.raises(exc, match=name):
        ops.write_paged_kv(**args, backend=backend)
    for t, copy in originals.values():  # the caches passed in, even if the test swapped one out
        assert torch.equal(t, copy)
