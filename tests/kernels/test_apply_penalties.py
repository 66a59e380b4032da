"""apply_penalties (Triton, CUDA and CPU twins) against its reference at odd sizes in every logits dtype, with a logit
bias on penalised, banned and -inf tokens beside rows without one; edge rows (no draft, no banned ids, no history, all
padding, -inf logits, repeated ids, min_tokens at its boundary); a row worked out by hand with and without a bias;
neutral values bit-exact; the reference against Hugging Face's processors at float64; and bad input."""
import pytest
import torch

from bild_kernels import ops
from bild_kernels import reference as R

from ..conftest import HAS_GPU, kernel_backends, requires_gpu

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
# (dtype, atol, rtol): the kernels compute as the reference does (float32, one rounding per operation), so the
# tolerances only allow a last-place difference of the output dtype
DTYPES = [(F32, 1e-5, 1e-6), (F16, 1e-3, 1e-3), (BF16, 1e-2, 1e-2), (F64, 1e-12, 1e-12)]


# The op also has a "cpu" twin (bild_kernels._cpu, csrc/cpu_penalties.cpp): every test runs it too.
@pytest.fixture(params=kernel_backends(cpu=True))
def backend_device(request):
    return request.param


def make_inputs(B, P, V, L, E, seed=0):
    """Rows of every kind: a history of L ids (a prompt, then output) drawn partly from a few ids (repeats within and
    between prompt and output), -1 pads scattered, drafts that repeat output tokens, penalties per row with neutral
    ones mixed in, min_tokens around each row's output length, banned ids with pads and duplicates."""
    g = torch.Generator().manual_seed(seed + B * 7 + P * 13 + V + L)
    few = torch.randint(0, min(V, 20), (B, L), generator=g)
    token_ids = torch.where(torch.rand(B, L, generator=g) < 0.5, few, torch.randint(0, V, (B, L), generator=g))
    token_ids[torch.rand(B, L, generator=g) < 0.1] = -1
    prompt_lens = torch.randint(0, L + 1, (B,), generator=g).int()
    draft_ids = torch.randint(0, V, (B, P - 1), generator=g)
    if L:
        draft_ids = torch.where(torch.rand(B, P - 1, generator=g) < 0.4,
                                token_ids.clamp(min=0).gather(1, torch.randint(0, L, (B, P - 1), generator=g)),
                                draft_ids)
    draft_ids[torch.rand(B, P - 1, generator=g) < 0.15] = -1
    repetition = torch.rand(B, generator=g, dtype=F64) * 1.5 + 0.4
    presence = torch.randn(B, generator=g, dtype=F64)
    frequency = torch.randn(B, generator=g, dtype=F64) * 0.5
    neutral = torch.rand(B, generator=g) < 0.25
    repetition[neutral], presence[neutral], frequency[neutral] = 1.0, 0.0, 0.0
    is_out = (token_ids >= 0) & (torch.arange(L)[None, :] >= prompt_lens[:, None].long())
    min_tokens = (is_out.sum(1) + torch.randint(-2, P + 2, (B,), generator=g)).clamp(min=0).int()
    banned_ids = torch.randint(-1, V, (B, E), generator=g)
    if E > 1:
        banned_ids[:, 1] = banned_ids[:, 0]
    # a logit bias of up to 3 distinct ids a row: the first in the history (penalised), the second banned, -1 pads,
    # rows without one
    E2 = min(3, V)
    bias_ids = torch.stack([torch.randperm(V, generator=g)[:E2] for _ in range(B)]) if B else torch.empty(0, E2)
    bias_ids = bias_ids.long()
    if L and E2:
        bias_ids[:, 0] = torch.where(token_ids[:, 0] >= 0, token_ids[:, 0], bias_ids[:, 0])
    if E and E2 > 1:
        bias_ids[:, 1] = torch.where(banned_ids[:, 0] >= 0, banned_ids[:, 0], bias_ids[:, 1])
    for j in range(1, E2):  # each id once a row
        bias_ids[:, j] = torch.where((bias_ids[:, j:j + 1] == bias_ids[:, :j]).any(1), -1, bias_ids[:, j])
    bias_ids[torch.rand(B, E2, generator=g) < 0.2] = -1
    bias_ids[torch.rand(B, generator=g) < 0.25] = -1
    bias_values = torch.randn(B, E2, generator=g, dtype=F64) * 3
    return (token_ids, prompt_lens, draft_ids, repetition, presence, frequency, min_tokens, banned_ids, bias_ids,
            bias_values)


def no_bias(B):
    return torch.empty((B, 0), dtype=torch.int64), torch.empty((B, 0), dtype=F64)


def make_logits(B, P, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed + B + P + V)
    z = torch.randn(B, P, V, generator=g) * 4
    z[torch.rand(B, P, V, generator=g) < 0.01] = float("-inf")
    return z.to(dtype)


def run(backend, device, logits, token_ids, prompt_lens, draft_ids, rep, pres, freq, min_tokens, banned_ids,
        bias_ids, bias_values):
    to = lambda x: x.to(device)  # noqa: E731
    return ops.apply_penalties(to(logits), to(token_ids), to(prompt_lens), to(draft_ids), repetition_penalty=to(rep),
                               presence_penalty=to(pres), frequency_penalty=to(freq), min_tokens=to(min_tokens),
                               banned_ids=to(banned_ids), bias_ids=to(bias_ids), bias_values=to(bias_values),
                               backend=backend).cpu()


def check(backend, device, logits, *args, atol, rtol):
    want = R.apply_penalties_ref(logits, *args)
    got = run(backend, device, logits, *args)
    assert got.dtype == logits.dtype and got.shape == logits.shape
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))  # the banned tokens, and -inf logits
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    return got, want


# The interpreter (and the reference) stream B * P * V logits: the large vocabularies run with few rows, and the
# largest batch at the smallest vocabulary.
@pytest.mark.parametrize("B, P, V, L, E", [(1, 1, 111, 7, 1), (7, 5, 111, 40, 3), (99, 3, 111, 60, 2),
                                           (7, 4, 32000, 300, 4), (2, 9, 32000, 1024, 2), (1, 3, 151936, 200, 1),
                                           (3, 2, 151936, 50, 0)])
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_apply_penalties_matches_reference(backend_device, B, P, V, L, E, dtype, atol, rtol):
    backend, device = backend_device
    check(backend, device, make_logits(B, P, V, dtype), *make_inputs(B, P, V, L, E), atol=atol, rtol=rtol)


@pytest.mark.slow
@pytest.mark.parametrize("B, P, V", [(99, 9, 32000), (64, 5, 128256)])
def test_apply_penalties_matches_reference_at_serving_batches(backend_device, B, P, V):
    backend, device = backend_device
    check(backend, device, make_logits(B, P, V, BF16), *make_inputs(B, P, V, 1024, 3), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("P, L, E", [(1, 0, 0), (1, 9, 0), (4, 0, 0), (3, 0, 2), (1, 0, 3)])
def test_apply_penalties_empty_parts(backend_device, P, L, E, dtype, atol, rtol):
    # no draft (P = 1), no banned ids (E = 0), no history (L = 0), and the three together
    backend, device = backend_device
    B, V = 5, 111
    check(backend, device, make_logits(B, P, V, dtype), *make_inputs(B, P, V, L, E), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_apply_penalties_padding_rows_and_infinite_logits(backend_device, dtype, atol, rtol):
    backend, device = backend_device
    B, P, V, L, E = 6, 4, 111, 20, 3
    logits = make_logits(B, P, V, dtype)
    logits[:, :, :10] = float("-inf")  # -inf logits that the history penalizes
    logits[1, :, 50] = float("inf")
    token_ids, prompt_lens, draft_ids, rep, pres, freq, min_tokens, banned_ids, bias_ids, bias_values = make_inputs(
        B, P, V, L, E)
    bias_ids[:, 0], bias_values[:, 0] = 4, 2.5  # a bias on a -inf logit
    token_ids[:, :4] = torch.arange(4) * 2  # ids 0, 2, 4, 6 (-inf logits) in every history
    token_ids[1, 5] = 50
    token_ids[0], draft_ids[0], banned_ids[0] = -1, -1, -1  # an all-padding row
    token_ids[2], prompt_lens[2] = -1, L  # a prompt of padding only
    rep[3], pres[3], freq[3] = 1.5, 2.0, 0.5
    got, _ = check(backend, device, logits, token_ids, prompt_lens, draft_ids, rep, pres, freq, min_tokens, banned_ids,
                   bias_ids, bias_values, atol=atol, rtol=rtol)
    assert torch.isneginf(got[:, :, :10]).all()


def test_apply_penalties_repeated_ids_by_hand(backend_device):
    """One row worked out by hand, so that the reference is checked too: prompt [5, 7, 5], output [3, 3, 5, -1],
    drafts [3, 9]; repetition 2, frequency 0.5, presence 0.25; min_tokens 5 with banned [9, 9, -1]."""
    backend, device = backend_device
    V = 12
    logits = torch.arange(3 * V, dtype=F32).reshape(1, 3, V) - 20.0  # negative and positive logits
    token_ids = torch.tensor([[5, 7, 5, 3, 3, 5, -1]])
    args = (token_ids, torch.tensor([3], dtype=torch.int32), torch.tensor([[3, 9]]), torch.tensor([2.0], dtype=F64),
            torch.tensor([0.25], dtype=F64), torch.tensor([0.5], dtype=F64), torch.tensor([5], dtype=torch.int32),
            torch.tensor([[9, 9, -1]]), *no_bias(1))
    got = run(backend, device, logits, *args)
    assert torch.equal(got, R.apply_penalties_ref(logits, *args))
    want = logits.clone()
    counts = [{3: 2, 5: 1}, {3: 3, 5: 1}, {3: 3, 5: 1, 9: 1}]  # output (and drafts before p) per position
    for p in range(3):
        for v in (3, 5, 7, 9):
            z = float(logits[0, p, v])
            c = counts[p].get(v, 0)
            if c or v in (5, 7):
                z = z * 2.0 if z < 0 else z / 2.0
            want[0, p, v] = z - 0.5 * c - 0.25 * (c > 0)
    want[0, :2, 9] = float("-inf")  # n_out = 3: positions 0 and 1 are below min_tokens 5, position 2 is at it
    assert torch.equal(got, want)


def test_apply_penalties_logit_bias_by_hand(backend_device):
    """Row 0 worked out by hand: prompt [5], output [3, 3], draft [3]; repetition 2, frequency 0.5, presence 0.25;
    min_tokens 3 with banned [9]; a bias on 3 (a negative logit the bias turns positive before repetition divides
    it), on 5 (the prompt's), on 9 (banned at position 0, not at 1), on 0 (a -inf logit) and on 7 (no penalty).
    Row 1: the same row with a bias of pads only, which changes no value."""
    backend, device = backend_device
    P, V = 2, 12
    logits = torch.arange(2 * P * V, dtype=F32).reshape(2, P, V) * 0.5 - 6.0  # exact in every step below
    logits[:, :, 0] = float("-inf")
    bias = {3: 10.0, 5: -1.0, 9: 50.0, 0: 1.0, 7: 0.5}
    bias_ids = torch.tensor([list(bias) + [-1], [-1] * 6])
    bias_values = torch.tensor([list(bias.values()) + [0.0], [7.0] * 6], dtype=F64)  # pads' values are ignored
    args = (torch.tensor([[5, 3, 3, -1]] * 2), torch.tensor([1, 1], dtype=torch.int32), torch.tensor([[3], [3]]),
            torch.full((2,), 2.0, dtype=F64), torch.full((2,), 0.25, dtype=F64), torch.full((2,), 0.5, dtype=F64),
            torch.full((2,), 3, dtype=torch.int32), torch.tensor([[9], [9]]))
    got = run(backend, device, logits, *args, bias_ids, bias_values)
    assert torch.equal(got, R.apply_penalties_ref(logits, *args, bias_ids, bias_values))
    want = logits[0].clone()
    counts = [{3: 2}, {3: 3}]  # output (and the draft before p) per position
    for p in range(P):
        for v in range(1, V):
            z = float(logits[0, p, v]) + bias.get(v, 0.0)
            c = counts[p].get(v, 0)
            if c or v == 5:
                z = z * 2.0 if z < 0 else z / 2.0
            want[p, v] = z - 0.5 * c - 0.25 * (c > 0)
    want[0, 9] = float("-inf")  # n_out = 2: position 0 is below min_tokens 3, position 1 is at it
    assert want[0, 3] == 1.5 and want[1, 9] == 50.0 + (12 + 9) * 0.5 - 6.0  # the bias first, then the penalties
    assert torch.equal(got[0], want)
    assert torch.equal(got[1], run(backend, device, logits, *args, *no_bias(2))[1])


@pytest.mark.parametrize("n_out, min_tokens", [(3, 3), (3, 4), (3, 6), (3, 7), (0, 1), (0, 0)])
def test_apply_penalties_min_tokens_boundary(backend_device, n_out, min_tokens):
    # Position p holds the banned ids back exactly while n_out + p < min_tokens.
    backend, device = backend_device
    P, V = 4, 111
    logits = make_logits(1, P, V, F32)
    token_ids = torch.tensor([[1, 2] + [10] * n_out + [-1]])  # a prompt of two, n_out outputs, a pad
    args = (token_ids, torch.tensor([2], dtype=torch.int32), torch.tensor([[4, -1, 6]]), torch.ones(1, dtype=F64),
            torch.zeros(1, dtype=F64), torch.zeros(1, dtype=F64), torch.tensor([min_tokens], dtype=torch.int32),
            torch.tensor([[0, 57]]), *no_bias(1))
    got = run(backend, device, logits, *args)
    held = torch.tensor([n_out + p < min_tokens for p in range(P)])
    assert torch.equal(torch.isneginf(got[0, :, 57]), held) and torch.equal(torch.isneginf(got[0, :, 0]), held)
    assert torch.equal(got, R.apply_penalties_ref(logits, *args))


@pytest.mark.parametrize("dtype", [F32, F16, BF16, F64])
def test_apply_penalties_neutral_values_are_bit_exact(backend_device, dtype):
    """repetition 1, presence 0, frequency 0 (and min_tokens 0, or no banned ids) give the logits back bit for bit,
    -0.0 and infinities included, whatever the history, drafts and banned ids."""
    backend, device = backend_device
    B, P, V, L, E = 4, 3, 111, 30, 2
    logits = make_logits(B, P, V, dtype)
    logits[:, :, 1] = -0.0
    logits[:, :, 2] = float("inf")
    token_ids, prompt_lens, draft_ids, *_, banned_ids, _, _ = make_inputs(B, P, V, L, E)
    token_ids[:, :3] = torch.tensor([0, 1, 2])
    ones, zeros = torch.ones(B, dtype=F64), torch.zeros(B, dtype=F64)
    min_tokens = torch.tensor([0, 0, 100, 100], dtype=torch.int32)
    banned_ids[2:] = -1  # min_tokens holds back nothing: only pads
    got = run(backend, device, logits, token_ids, prompt_lens, draft_ids, ones, zeros, zeros, min_tokens, banned_ids,
              *no_bias(B))
    bits = {F64: torch.int64, F32: torch.int32, F16: torch.int16, BF16: torch.int16}[dtype]
    assert torch.equal(got.view(bits), logits.view(bits))
    # and the op's defaults are neutral
    assert torch.equal(ops.apply_penalties(logits.to(device), token_ids.to(device), prompt_lens.to(device),
                                           backend=backend).cpu().view(bits), logits.view(bits))


def test_reference_matches_hugging_face_processors_at_float64():
    """The reference at float64 is Hugging Face's RepetitionPenaltyLogitsProcessor (over prompt and output) followed
    by MinNewTokensLengthLogitsProcessor at every position p, whose input_ids are the committed tokens plus the
    drafts before p: bit for bit."""
    from transformers.generation.logits_process import (MinNewTokensLengthLogitsProcessor,
                                                        RepetitionPenaltyLogitsProcessor)
    g = torch.Generator().manual_seed(3)
    B, P, V, prompt_len, L = 3, 4, 97, 6, 15
    logits = torch.randn(B, P, V, generator=g, dtype=F64) * 5
    token_ids = torch.randint(0, 30, (B, L), generator=g)  # no pads: HF's input_ids have none
    draft_ids = torch.randint(0, 30, (B, P - 1), generator=g)
    eos = [2, 7, 95]
    for penalty, min_new in [(1.3, 11), (0.8, 0), (1.0, L - prompt_len + 2), (2.5, 100)]:
        got = R.apply_penalties_ref(logits, token_ids, torch.full((B,), prompt_len, dtype=torch.int32), draft_ids,
                                    torch.full((B,), penalty, dtype=F64), torch.zeros(B, dtype=F64),
                                    torch.zeros(B, dtype=F64), torch.full((B,), min_new, dtype=torch.int32),
                                    torch.tensor([eos] * B), *no_bias(B))
        rep = RepetitionPenaltyLogitsProcessor(penalty)
        min_len = MinNewTokensLengthLogitsProcessor(prompt_len, min_new, eos)
        for p in range(P):
            input_ids = torch.cat([token_ids, draft_ids[:, :p]], 1)
            want = min_len(input_ids, rep(input_ids, logits[:, p].clone()))
            assert torch.equal(got[:, p], want), (penalty, min_new, p)


@requires_gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_apply_penalties_captures_in_a_cuda_graph(backend):
    # No host reads in the launch: a captured op replays with new penalties and history read from the same buffers.
    from bild_kernels._backend import cuda_extension
    if backend == "cuda" and cuda_extension() is None:
        pytest.skip("bild_kernels._C was not built")
    B, P, V, L, E = 8, 5, 32000, 256, 2
    logits = make_logits(B, P, V, BF16).cuda()
    args = [x.cuda() for x in make_inputs(B, P, V, L, E)]
    def fn():
        return ops.apply_penalties(logits, *args[:3], repetition_penalty=args[3], presence_penalty=args[4],
                                   frequency_penalty=args[5], min_tokens=args[6], banned_ids=args[7],
                                   bias_ids=args[8], bias_values=args[9], backend=backend)

    with ops.trusted_inputs():
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
    args[3].mul_(1.25)
    args[0][:, : L // 2] = args[0][:, L // 2:]
    graph.replay()
    torch.testing.assert_close(out, R.apply_penalties_ref(logits, *args), atol=1e-2, rtol=1e-2)


def _bad_cases():
    z = torch.zeros(2, 3, 11)
    ids = torch.tensor([[1, 2, 3], [4, 5, -1]])
    return [
        (dict(logits=torch.zeros(2, 11)), ValueError, "logits"),
        (dict(logits=z.int()), TypeError, "logits"),
        (dict(logits=[[[0.0]]]), TypeError, "logits"),
        (dict(logits=torch.zeros(2, 0, 11)), ValueError, "logits"),
        (dict(logits=torch.zeros(2, 3, 0)), ValueError, "logits"),
        (dict(token_ids=ids.float()), TypeError, "token_ids"),
        (dict(token_ids=ids[0]), ValueError, "token_ids"),
        (dict(token_ids=torch.zeros(3, 3, dtype=torch.int64)), ValueError, "token_ids"),
        (dict(token_ids=torch.tensor([[1, 2, 11], [0, 0, 0]])), ValueError, "token_ids"),
        (dict(token_ids=torch.tensor([[1, 2, -2], [0, 0, 0]])), ValueError, "token_ids"),
        (dict(token_ids=ids.to("meta")), ValueError, "token_ids"),
        (dict(prompt_lens=4), ValueError, "prompt_lens"),
        (dict(prompt_lens=-1), ValueError, "prompt_lens"),
        (dict(prompt_lens=1.5), TypeError, "prompt_lens"),
        (dict(prompt_lens=torch.tensor([1, 2, 3])), ValueError, "prompt_lens"),
        (dict(prompt_lens=torch.tensor([1.0, 2.0])), TypeError, "prompt_lens"),
        (dict(draft_ids=torch.zeros(2, 3, dtype=torch.int64)), ValueError, "draft_ids"),
        (dict(draft_ids=torch.zeros(2, 2)), TypeError, "draft_ids"),
        (dict(draft_ids=torch.tensor([[0, 11], [0, 0]])), ValueError, "draft_ids"),
        (dict(draft_ids=torch.zeros(2, 2, dtype=torch.int64, device="meta")), ValueError, "draft_ids"),
        (dict(banned_ids=torch.zeros(2, dtype=torch.int64)), ValueError, "banned_ids"),
        (dict(banned_ids=torch.zeros(3, 1, dtype=torch.int64)), ValueError, "banned_ids"),
        (dict(banned_ids=torch.tensor([[0], [12]])), ValueError, "banned_ids"),
        (dict(banned_ids=torch.zeros(2, 1, dtype=torch.bool)), TypeError, "banned_ids"),
        (dict(repetition_penalty=0.0), ValueError, "repetition_penalty"),
        (dict(repetition_penalty=-1.0), ValueError, "repetition_penalty"),
        (dict(repetition_penalty=float("nan")), ValueError, "repetition_penalty"),
        (dict(repetition_penalty=float("inf")), ValueError, "repetition_penalty"),
        (dict(repetition_penalty=1e-300), ValueError, "repetition_penalty"),  # 0 in float32
        (dict(repetition_penalty=torch.tensor([1, 2])), TypeError, "repetition_penalty"),
        (dict(repetition_penalty=torch.ones(3)), ValueError, "repetition_penalty"),
        (dict(repetition_penalty="1.2"), TypeError, "repetition_penalty"),
        (dict(presence_penalty=float("nan")), ValueError, "presence_penalty"),
        (dict(presence_penalty=float("-inf")), ValueError, "presence_penalty"),
        (dict(presence_penalty=torch.zeros(2, device="meta")), ValueError, "presence_penalty"),
        (dict(frequency_penalty=float("inf")), ValueError, "frequency_penalty"),
        (dict(frequency_penalty=1e39), ValueError, "frequency_penalty"),  # inf in float32
        (dict(frequency_penalty=torch.tensor([0.0, float("nan")])), ValueError, "frequency_penalty"),
        (dict(min_tokens=-1), ValueError, "min_tokens"),
        (dict(min_tokens=2.5), TypeError, "min_tokens"),
        (dict(min_tokens=2**31), ValueError, "min_tokens"),
        (dict(min_tokens=torch.tensor([2**40, 0])), ValueError, "min_tokens"),
        (dict(min_tokens=torch.tensor([True, False])), TypeError, "min_tokens"),
        (dict(bias_ids=torch.tensor([[1], [11]]), bias_values=torch.ones(2, 1, dtype=F64)), ValueError, "bias_ids"),
        (dict(bias_ids=torch.tensor([[1, 1], [2, 3]]), bias_values=torch.ones(2, 2, dtype=F64)), ValueError,
         "bias_ids"),
        (dict(bias_ids=torch.tensor([[1], [2]])), ValueError, "bias_ids and bias_values"),
        (dict(bias_values=torch.ones(2, 1, dtype=F64)), ValueError, "bias_ids and bias_values"),
        (dict(bias_ids=torch.tensor([[1], [2]]), bias_values=torch.ones(2, 2, dtype=F64)), ValueError, "bias_values"),
        (dict(bias_ids=torch.tensor([[1], [2]]), bias_values=torch.tensor([[1.0], [float("nan")]], dtype=F64)),
         ValueError, "bias_values"),
        (dict(bias_ids=torch.tensor([[1], [2]]), bias_values=torch.tensor([[1.0], [1e39]], dtype=F64)), ValueError,
         "bias_values"),
        (dict(bias_ids=torch.tensor([[1.0], [2.0]]), bias_values=torch.ones(2, 1, dtype=F64)), TypeError, "bias_ids"),
        (dict(bias_ids=torch.tensor([[1], [-2]]), bias_values=torch.ones(2, 1, dtype=F64)), ValueError, "bias_ids"),
        (dict(bias_ids=torch.tensor([1, 2]), bias_values=torch.ones(2, dtype=F64)), ValueError, "bias_ids"),
        (dict(bias_ids=torch.tensor([[1], [2], [3]]), bias_values=torch.ones(3, 1, dtype=F64)), ValueError,
         "bias_ids"),
        (dict(bias_ids=torch.tensor([[1], [2]]), bias_values=torch.tensor([[1], [2]])), TypeError, "bias_values"),
        (dict(bias_ids=torch.tensor([[1], [2]]), bias_values=torch.tensor([[1.0], [float("-inf")]], dtype=F64)),
         ValueError, "bias_values"),
        (dict(backend="tpu"), ValueError, "backend"),
    ]


@pytest.mark.parametrize("kwargs, exc, name", _bad_cases())
def test_apply_penalties_bad_input(kwargs, exc, name):
    a = dict(logits=torch.zeros(2, 3, 11), token_ids=torch.tensor([[1, 2, 3], [4, 5, -1]]), prompt_lens=1,
             backend="ref")
    a.update(kwargs)
    with pytest.raises(exc, match=name):
        ops.apply_penalties(a.pop("logits"), a.pop("token_ids"), a.pop("prompt_lens"), **a)


def test_apply_penalties_float64_logits_take_penalties_float32_refuses():
    # 1e-300 is a valid repetition penalty for float64 logits (their compute dtype), not for float32 ones.
    logits, ids = torch.randn(1, 1, 5, dtype=F64), torch.tensor([[1]])
    out = ops.apply_penalties(logits, ids, 0, repetition_penalty=1e-300, backend="ref")
    assert out[0, 0, 1] == (logits[0, 0, 1] * 1e-300 if logits[0, 0, 1] < 0 else logits[0, 0, 1] / 1e-300)
    with pytest.raises(ValueError, match="repetition_penalty rounds to 0"):
        ops.apply_penalties(logits.float(), ids, 0, repetition_penalty=1e-300, backend="ref")


@pytest.mark.skipif(HAS_GPU, reason="checks the error of a CUDA op on CPU tensors")
def test_apply_penalties_cuda_backend_on_cpu_tensors_fails_clearly():
    with pytest.raises(ValueError, match="backend 'cuda' .*apply_penalties"):
        ops.apply_penalties(torch.zeros(1, 1, 5), torch.tensor([[1]]), 0, backend="cuda")
