"""Quality and speed of decoding policies against the large model alone, measured in one run.

Faithfulness: exact match and ROUGE-L (token level) of each output against the large model's own greedy
output. Plausibility: the large model's mean negative log-likelihood per token of the generated text,
beside that of its own greedy text (lower is more likely; a lossy policy should stay close).
Speed: generated tokens per second of wall time and the speed-up over `LargeOnly()` on the same engine,
one request at a time (batch 1, the latency-critical use) or all prompts together (batched).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from bild_kernels.engine.params import SamplingParams
from bild_kernels.engine.policies import LargeOnly, Policy
from bild_kernels.engine.sequence import RequestMetrics


def rouge_l(candidate: list, reference: list) -> float:
    """ROUGE-L F1 over tokens: the longest common subsequence against both lengths."""
    if not candidate or not reference:
        return float(candidate == reference)
    prev = [0] * (len(reference) + 1)
    for c in candidate:
        cur = [0]
        for j, r in enumerate(reference):
            cur.append(prev[j] + 1 if c == r else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(candidate), lcs / len(reference)
    return 2 * p * r / (p + r)


@dataclass
class EvalRow:
    policy: str
    batch: int
    prompts: int
    tokens: int
    tokens_per_s: float
    speedup: float  # over LargeOnly in the same run and batch mode
    exact_match: float  # fraction of outputs identical to the large model's greedy output
    rouge_l: float  # mean ROUGE-L against it
    nll: float  # the large model's mean NLL per generated token
    nll_ratio: float  # nll / the large model's greedy text's nll
    acceptance: float
    mean_accepted: float
    fallbacks: int
    rollbacks: int
    large_passes: int
    passes_per_token: float = 0.0  # large-model passes per generated token (Jacobi's iterations per token)
    draft_s: float = 0.0  # seconds in the draft phase (small model, sampling)
    verify_s: float = 0.0  # seconds in the verify phase (large model, verify_draft, rollback)
    overhead_s: float = 0.0  # the rest of the wall time: the engine's own bookkeeping
    ttft_ms: float = 0.0  # mean time to a request's first token (its prompt's prefill): the same work in every policy
    decode_tokens_per_s: float = 0.0  # tokens after each request's first / the time after it, summed over requests
    decode_speedup: float = 0.0  # the same over LargeOnly's: the speed-up of the decode phase, prefill left out
    cached_prompt: float = 0.0  # mean prompt positions a request reused from the engine's prefix cache

    def as_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


_ALWAYS = ("fallback_threshold", "rollback_threshold", "max_draft_len", "block_size", "exit_layer")


def describe(policy: Policy) -> str:
    """A short label for a policy: its main knobs, and any other parameter that differs from its default."""
    import dataclasses
    if not dataclasses.is_dataclass(policy):
        return policy.name
    args = []
    for f in dataclasses.fields(policy):
        if not f.init or not f.compare:
            continue
        val = getattr(policy, f.name)
        default = f.default if f.default is not dataclasses.MISSING else dataclasses.MISSING
        if f.name in _ALWAYS or val != default:
            args.append(f"{f.name}={describe(val) if isinstance(val, Policy) else val}")
    return f"{policy.name}({','.join(args)})" if args else policy.name


def run_policy(engine, prompts: list[list[int]], params: SamplingParams, policy: Policy, batch: int):
    """(outputs, wall seconds): one request at a time when batch == 1, else the engine's own batching
    (at most engine.max_batch_size together). With the engine's prefix cache on, the prompts' own kept positions
    (another policy's or round's runs of them) are dropped first: each reuses only what it shares with the prompts
    run before it (a system prompt, a template), the same for every policy, as in service."""
    split0 = dict(engine.time_split)
    cache = getattr(engine, "prefix_cache", None)
    for p in prompts if cache is not None else ():
        cache.discard(p)
    t0 = time.perf_counter()
    if batch == 1:
        outs = [engine.generate([p], params, policy=policy)[0] for p in prompts]
    else:
        outs = engine.generate(prompts, params, policy=policy)
    wall = time.perf_counter() - t0
    bad = [o.error for o in outs if o.error]
    if bad:
        raise RuntimeError(f"{describe(policy)}: {len(bad)} requests failed, first: {bad[0]}")
    split = {k: engine.time_split[k] - split0.get(k, 0.0) for k in ("draft", "verify")}
    return outs, wall, split


def mean_nll(engine, prompts, outputs) -> float:
    total = n = 0.0
    for p, o in zip(prompts, outputs):
        if o.token_ids:
            lp = engine.score(p, o.token_ids)
            total -= sum(lp)
            n += len(lp)
    return total / n if n else 0.0


def evaluate(engine, prompts: list[list[int]], policies: list[Policy], *, batch: int = 1, max_tokens: int = 64,
             progress=None, interleave: bool = True, repeat: int = 1) -> list[EvalRow]:
    """One row for LargeOnly (the reference) and one per policy, greedy decoding (temperature 0).

    interleave (default): the prompts go chunk by chunk (one prompt at batch 1, else `batch` of them) and
    every policy, LargeOnly included, runs on each chunk in turn, in an order that rotates from chunk to
    chunk; a machine whose speed drifts during the run (a shared CPU) then slows every policy alike, and
    the speed-ups compare like with like. False: each policy over all prompts, one after the other.
    repeat: each policy runs each chunk that many times (the rounds interleaved as above, each in another
    rotation) and its fastest run counts, times and metrics alike: on a machine whose neighbours slow it now
    and then, every policy is timed at its undisturbed speed (greedy decoding: the runs' tokens are the same,
    checked; a RuntimeError otherwise).
    progress: called with no argument after each (chunk, policy) run: `eval_runs` of them in all."""
    if not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"repeat must be an int >= 1, got {repeat!r}")
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    everyone = [LargeOnly()] + list(policies)
    for pol in everyone:  # warm-up: first-call allocations and caches out of the measured runs
        engine.generate([prompts[0]], SamplingParams(max_tokens=4), policy=pol)
    chunks = [prompts[i:i + batch] for i in range(0, len(prompts), batch)] if interleave else [prompts]
    outs = [[] for _ in everyone]
    walls = [0.0] * len(everyone)
    splits = [{"draft": 0.0, "verify": 0.0} for _ in everyone]
    for c, chunk in enumerate(chunks):
        best = [None] * len(everyone)  # each policy's fastest run on this chunk: (outputs, wall, split)
        for r in range(repeat):
            for j in range(len(everyone)):
                k = (j + c + r) % len(everyone)
                run = run_policy(engine, chunk, params, everyone[k], batch)
                if best[k] is not None and [o.token_ids for o in run[0]] != [o.token_ids for o in best[k][0]]:
                    raise RuntimeError(f"{describe(everyone[k])}: a repeated run of the same prompts decoded "
                                       "other tokens")
                if best[k] is None or run[1] < best[k][1]:
                    best[k] = run
                if progress:
                    progress()
        for k, (o, wall, split) in enumerate(best):
            outs[k] += o
            walls[k] += wall
            for name in splits[k]:
                splits[k][name] += split[name]
    ref_ids = [o.token_ids for o in outs[0]]
    ref_nll = mean_nll(engine, prompts, outs[0])
    base_tps = sum(len(r) for r in ref_ids) / walls[0]
    base_decode = _decode_rate(outs[0])
    rows = [_row("large-only", batch, prompts, outs[0], walls[0], base_tps, ref_ids, ref_nll, ref_nll, splits[0],
                 base_decode)]
    for pol, o, wall, split in zip(policies, outs[1:], walls[1:], splits[1:]):
        rows.append(_row(describe(pol), batch, prompts, o, wall, base_tps, ref_ids, mean_nll(engine, prompts, o),
                         ref_nll, split, base_decode))
    return rows


def _decode_rate(outs) -> float:
    """Output tokens after each request's first, over the time after it, summed over the requests."""
    toks = sum(max(len(o.token_ids) - 1, 0) for o in outs)
    secs = sum(o.metrics.decode_time for o in outs)
    return toks / secs if secs > 0 else 0.0


def eval_runs(n_prompts: int, n_policies: int, *, batch: int = 1, interleave: bool = True, repeat: int = 1) -> int:
    """How many times `evaluate` calls `progress` for n_prompts prompts and n_policies policies."""
    return (-(-n_prompts // batch) if interleave else 1) * (n_policies + 1) * repeat


def _row(name, batch, prompts, outs, wall, base_tps, ref_ids, nll, ref_nll, split, base_decode) -> EvalRow:
    m = RequestMetrics.aggregate(o.metrics for o in outs)
    decode = _decode_rate(outs)
    toks = sum(len(o.token_ids) for o in outs)
    tps = toks / wall if wall > 0 else 0.0
    return EvalRow(
        policy=name, batch=batch, prompts=len(prompts), tokens=toks, tokens_per_s=tps,
        speedup=tps / base_tps if base_tps else 0.0,
        exact_match=sum(o.token_ids == r for o, r in zip(outs, ref_ids)) / len(outs),
        rouge_l=sum(rouge_l(o.token_ids, r) for o, r in zip(outs, ref_ids)) / len(outs),
        nll=nll, nll_ratio=nll / ref_nll if ref_nll else 0.0, acceptance=m.acceptance_rate,
        mean_accepted=m.mean_accepted_length, fallbacks=m.fallbacks, rollbacks=m.rollbacks,
        large_passes=m.large_passes, passes_per_token=m.large_passes / toks if toks else 0.0, draft_s=split["draft"], verify_s=split["verify"],
        overhead_s=max(wall - split["draft"] - split["verify"], 0.0),
        ttft_ms=1e3 * sum(o.metrics.time_to_first_token for o in outs) / len(outs) if outs else 0.0,
        decode_tokens_per_s=decode, decode_speedup=decode / base_decode if base_decode else 0.0,
        cached_prompt=m.cached_prompt_tokens / len(outs) if outs else 0.0)


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A plain-text table (also valid Markdown) of dict rows."""
    if not rows:
        return ""
    columns = columns or list(rows[0])
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    out = [line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in cells]
    return "\n".join(out)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def family(label: str) -> str:
    """The curve a policy label belongs to on the trade-off plot."""
    name = label.split("(")[0]
    if name == "bild" and "fallback_signal=energy" in label:
        return "bild, energy fallback (E-LANG)"
    if name == "bild" and "=auto" in label:
        return "bild, auto thresholds (FREE)"
    if "lookup=" in label:
        return f"{name} + n-gram lookup"
    return name


def plot_tradeoff(rows: list[dict], path, title: str = "") -> None:
    """Speed-up against quality (NLL ratio, and ROUGE-L), one series per policy family, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    families: dict[str, list[dict]] = {}
    for r in rows:
        families.setdefault(r.get("family") or family(r["policy"]), []).append(r)
    for ax, metric, label in ((axes[0], "nll_ratio", "NLL per token / large model's greedy NLL (lower is better)"),
                              (axes[1], "rouge_l", "ROUGE-L vs large model's greedy output (higher is better)")):
        for fam, rs in families.items():
            ax.scatter([r[metric] for r in rs], [r["speedup"] for r in rs], label=fam, s=28)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel(label, fontsize=8)
        ax.set_ylabel("speed-up over LargeOnly")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
