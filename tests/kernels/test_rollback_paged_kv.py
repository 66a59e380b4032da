"""reserve_paged_kv and rollback_paged_kv (Triton, CUDA and CPU twins) against their references: bit-identical tables, lengths,
free stack and num_free, including shortfalls, inactive rows, rollback to 0 and past 0, and bad input."""
import random

import pytest
import torch

from bild_kernels import ops
from bild_kernels import reference as R

from ..conftest import kernel_backends

NAMES = ("block_tables", "context_lens", "free_blocks", "num_free")


# These two ops also have a "cpu" twin (bild_kernels._cpu, csrc/cpu_paged_kv.cpp): every test runs it too.
@pytest.fixture(params=kernel_backends(cpu=True))
def backend_device(request):
    return request.param


def make_state(B, M, block_size, num_blocks, device, seed=0, p_active=0.8, max_extra=2):
    """A valid random state: active rows hold ceil(len / block_size) blocks plus up to max_extra reserved ones."""
    rng = random.Random(seed)
    ids = list(range(num_blocks))
    rng.shuffle(ids)
    tables = [[-1] * M for _ in range(B)]
    lens = [-1] * B
    for b in range(B):
        if rng.random() >= p_active:
            continue
        n = rng.randint(0, M * block_size // 2)
        held = min(M, -(-n // block_size) + rng.randint(0, max_extra), len(ids))
        if held * block_size < n:
            continue  # pool ran dry: leave the row inactive
        lens[b] = n
        tables[b][:held] = [ids.pop() for _ in range(held)]
    # Entries above the stack top are junk that no op may read into a table.
    free = ids + [10**6 + i for i in range(num_blocks - len(ids))]
    i32 = dict(dtype=torch.int32, device=device)
    return {"block_tables": torch.tensor(tables, **i32).reshape(B, M), "context_lens": torch.tensor(lens, **i32),
            "free_blocks": torch.tensor(free, **i32), "num_free": torch.tensor([len(ids)], **i32)}


def clone(state):
    return {k: v.clone() for k, v in state.items()}


def assert_same(got, want):
    for k in NAMES:
        assert torch.equal(got[k], want[k]), k


def run(op, backend, state, counts, block_size):
    want = clone(state)
    ref = R.reserve_paged_kv_ref if op == "reserve" else R.rollback_paged_kv_ref
    ref(want["block_tables"], want["context_lens"], counts.clone(), want["free_blocks"], want["num_free"], block_size)
    fn = ops.reserve_paged_kv if op == "reserve" else ops.rollback_paged_kv
    counts_before = counts.clone()
    fn(state["block_tables"], state["context_lens"], counts, state["free_blocks"], state["num_free"], block_size,
       backend=backend)
    assert torch.equal(counts, counts_before)
    assert_same(state, want)
    return want


CASES = [(1, 1, 3), (7, 16, 5), (99, 16, 9), (99, 1, 40), (64, 4, 1)]  # (B, block_size, M)


@pytest.mark.parametrize("B, block_size, M", CASES)
def test_reserve_paged_kv_matches_reference(backend_device, B, block_size, M):
    backend, device = backend_device
    state = make_state(B, M, block_size, num_blocks=B * M, device=device, seed=B + M)
    room = M * block_size - state["context_lens"].clamp(min=0)  # never ask for more than a table holds
    num_new = (torch.rand(B, device=device) * (room + 1).clamp(max=3 * block_size)).int()
    num_new[::3] = 0  # rows with no new tokens
    run("reserve", backend, state, num_new, block_size)


@pytest.mark.parametrize("B, block_size, M", CASES)
def test_reserve_paged_kv_shortfall_changes_only_num_free(backend_device, B, block_size, M):
    backend, device = backend_device
    state = make_state(B, M, block_size, num_blocks=B * M // 2 + 1, device=device, seed=B, p_active=1.0,
                       max_extra=0)
    num_new = (M * block_size - state["context_lens"].clamp(min=0)).int()  # fill every table to the brim
    before = clone(state)
    want = run("reserve", backend, state, num_new, block_size)
    active = before["context_lens"] >= 0
    need = M - (before["block_tables"] >= 0).sum(1)
    missing = int(need[active].sum()) - int(before["num_free"])
    assert missing > 0
    assert int(want["num_free"]) == -1 - missing
    for k in NAMES[:3]:
        assert torch.equal(state[k], before[k]), k


def test_reserve_paged_kv_exact_fit_and_inactive_rows(backend_device):
    backend, device = backend_device
    state = make_state(9, 6, 4, num_blocks=40, device=device, seed=3)
    inactive = state["context_lens"] < 0
    assert bool(inactive.any())
    free = int(state["num_free"])
    held = (state["block_tables"] >= 0).sum(1)
    # Ask for exactly the free blocks: spread them over the active rows (in whole blocks past what they hold).
    num_new = torch.zeros(9, dtype=torch.int32, device=device)
    for b in range(9):
        if inactive[b]:
            num_new[b] = 100  # ignored: inactive rows are untouched whatever they ask for
            continue
        extra = min(free, 6 - int(held[b]))
        num_new[b] = int(held[b] + extra) * 4 - int(state["context_lens"][b])
        free -= extra
    assert free == 0  # the tables have room for the whole pool
    want = run("reserve", backend, state, num_new, 4)
    assert int(want["num_free"]) == 0


@pytest.mark.parametrize("B, block_size, M", CASES)
def test_rollback_paged_kv_matches_reference(backend_device, B, block_size, M):
    backend, device = backend_device
    state = make_state(B, M, block_size, num_blocks=B * M, device=device, seed=7 * B + M)
    lens = state["context_lens"].clamp(min=0)
    num_rejected = (torch.rand(B, device=device) * (lens + 1)).int()
    num_rejected[1::4] = lens[1::4]  # roll back to 0
    num_rejected[2::4] = lens[2::4] + 5  # more than held: clamped at 0
    num_rejected[3::4] = 0
    run("rollback", backend, state, num_rejected, block_size)


def test_reserve_then_rollback_round_trip(backend_device):
    backend, device = backend_device
    B, bs, M = 12, 2, 8
    state = make_state(B, M, bs, num_blocks=B * M, device=device, seed=11)
    for step in range(4):
        num_new = torch.randint(0, 4, (B,), dtype=torch.int32, device=device)
        run("reserve", backend, state, num_new, bs)
        state["context_lens"] += torch.where(state["context_lens"] >= 0, num_new, 0).int()
        run("rollback", backend, state, torch.randint(0, 5, (B,), dtype=torch.int32, device=device), bs)


def test_rollback_paged_kv_empty_batch(backend_device):
    backend, device = backend_device
    state = make_state(0, 4, 2, num_blocks=5, device=device)
    run("rollback", backend, state, torch.zeros(0, dtype=torch.int32, device=device), 2)
    run("reserve", backend, state, torch.zeros(0, dtype=torch.int32, device=device), 2)


BAD = [
    ("reserve", lambda s, c: c.__setitem__(0, -1), ValueError, "num_new"),
    ("rollback", lambda s, c: c.__setitem__(1, -3), ValueError, "num_rejected"),
    ("rollback", lambda s, c: s.update(counts=c.long()), TypeError, "num_rejected"),
    ("reserve", lambda s, c: s.update(counts=c[:-1]), ValueError, "num_new"),
    ("reserve", lambda s, c: s.update(block_tables=s["block_tables"].long()), TypeError, "block_tables"),
    ("rollback", lambda s, c: s.update(context_lens=s["context_lens"][:-1]), ValueError, "context_lens"),
    ("reserve", lambda s, c: s.update(num_free=s["num_free"].repeat(2)), ValueError, "num_free"),
    ("rollback", lambda s, c: s["num_free"].fill_(-1), ValueError, "num_free"),
    ("reserve", lambda s, c: s.update(block_size=0), ValueError, "block_size"),
    ("reserve", lambda s, c: c.fill_(10**4), ValueError, "num_new"),  # beyond a table's capacity
    ("rollback", lambda s, c: s.update(free_blocks=s["free_blocks"].to("meta")), ValueError, "free_blocks"),
]


@pytest.mark.parametrize("op, mutate, exc, name", BAD)
def test_paged_kv_tables_bad_input(backend_device, op, mutate, exc, name):
    backend, device = backend_device
    state = make_state(5, 4, 2, num_blocks=20, device=device, seed=1)
    counts = torch.ones(5, dtype=torch.int32, device=device)
    args = {**state, "counts": counts, "block_size": 2}
    mutate(args, counts)
    snapshot = {k: state[k].clone() for k in NAMES if k != "num_free"}
    fn = ops.reserve_paged_kv if op == "reserve" else ops.rollback_paged_kv
    with pytest.raises(exc, match=name):
        fn(args["block_tables"], args["context_lens"], args["counts"], args["free_blocks"], args["num_free"],
           args["block_size"], backend=backend)
    for k, v in snapshot.items():
        assert torch.equal(state[k], v), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
def test_reserve_rollback_replay_in_cuda_graph():
    # The point of doing the bookkeeping on the device: a reserve + rollback step captured once, replayed.
    B, bs, M = 64, 16, 8
    state = make_state(B, M, bs, num_blocks=B * M, device="cuda", seed=5)
    num_new = torch.randint(0, 20, (B,), dtype=torch.int32, device="cuda")
    num_rejected = torch.randint(0, 30, (B,), dtype=torch.int32, device="cuda")

    def step(s):
        ops.reserve_paged_kv(s["block_tables"], s["context_lens"], num_new, s["free_blocks"], s["num_free"], bs,
                             backend="triton")
        ops.rollback_paged_kv(s["block_tables"], s["context_lens"], num_rejected, s["free_blocks"], s["num_free"],
                              bs, backend="triton")

    step(clone(state))  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(state)
    want = clone(state)
    R.reserve_paged_kv_ref(want["block_tables"], want["context_lens"], num_new, want["free_blocks"],
                           want["num_free"], bs)
    R.rollback_paged_kv_ref(want["block_tables"], want["context_lens"], num_rejected, want["free_blocks"],
                            want["num_free"], bs)
    graph.replay()
    torch.cuda.synchronize()
    assert_same(state, want)
