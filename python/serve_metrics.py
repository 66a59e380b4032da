"""Prometheus metrics of python/serve.py (GET /metrics): counters and latency histograms of the requests it served,
and the engine's load at the time of the scrape."""
from __future__ import annotations

import threading

# seconds: a CPU's time to first token is ~20 ms for the default pair, a GPU's far less; long answers take seconds
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
# a token's seconds in the decode phase: ~1-6 ms on a GPU or the default pair's CPU, tens of ms for larger CPU models
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
COUNTERS = {  # RequestMetrics field -> (metric, help)
    "prompt_tokens": ("bild_prompt_tokens_total", "Prompt tokens of the requests served."),
    "cached_prompt_tokens": ("bild_cached_prompt_tokens_total", "Prompt positions copied from the prefix cache."),
    "generated_tokens": ("bild_generation_tokens_total", "Tokens generated."),
    "large_passes": ("bild_large_passes_total", "Large-model passes, summed over requests."),
    "prefill_chunks": ("bild_prefill_chunks_total", "Chunks of long prompts prefilled before their first pass."),
    "drafted_tokens": ("bild_drafted_tokens_total", "Tokens drafted for verification."),
    "accepted_tokens": ("bild_accepted_tokens_total", "Drafted tokens the large model kept."),
    "fallbacks": ("bild_fallbacks_total", "Draft runs the small model ended itself (BiLD's fallback)."),
    "rollbacks": ("bild_rollbacks_total", "Verification passes that rejected a drafted token."),
    "preemptions": ("bild_preemptions_total", "Times a running request's KV blocks were taken back for others."),
}
HISTOGRAMS = {  # RequestMetrics field -> (metric, help, buckets): vLLM's request histograms
    "time_to_first_token": ("bild_time_to_first_token_seconds", "From a request's arrival to its first token.",
                            BUCKETS),
    "wall_time": ("bild_request_duration_seconds", "From a request's arrival to its end.", BUCKETS),
    "queue_time": ("bild_request_queue_time_seconds", "From a request's arrival to its first row in the running "
                   "batch.", BUCKETS),
    "time_per_output_token": ("bild_time_per_output_token_seconds", "A request's decode time per token after its "
                              "first.", TPOT_BUCKETS),
    "prompt_tokens": ("bild_request_prompt_tokens", "Prompt tokens per request.", TOKEN_BUCKETS),
    "generated_tokens": ("bild_request_generation_tokens", "Tokens generated per request.", TOKEN_BUCKETS),
}
SKIP = {  # what a request lacks to be counted in a histogram
    "time_to_first_token": lambda m: not m.first_token_time, "queue_time": lambda m: not m.scheduled_time,
    "time_per_output_token": lambda m: m.generated_tokens < 2}


class ServiceMetrics:
    """Thread-safe totals over the requests a service saw end."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[str, int] = {}  # finish reason -> count
        self.totals = dict.fromkeys(COUNTERS, 0)
        self.hist = {k: [0] * (len(h[2]) + 1) for k, h in HISTOGRAMS.items()}  # per bucket (the last: +Inf)
        self.sums = dict.fromkeys(HISTOGRAMS, 0.0)
        self.accepted: dict[int, int] = {}  # drafted tokens a verification pass kept -> passes

    def observe(self, out) -> None:
        """Count one ended request (a RequestOutput)."""
        m = out.metrics
        with self._lock:
            self.requests[out.finish_reason] = self.requests.get(out.finish_reason, 0) + 1
            for k in COUNTERS:
                self.totals[k] += getattr(m, k)
            for k, (_, _, buckets) in HISTOGRAMS.items():
                if k in SKIP and SKIP[k](m):
                    continue  # (no token: no time to it; never scheduled: no queue time)
                v = getattr(m, k)
                self.hist[k][next((i for i, b in enumerate(buckets) if v <= b), len(buckets))] += 1
                self.sums[k] += v
            for n, c in m.accepted_lengths.items():
                self.accepted[n] = self.accepted.get(n, 0) + c

    def ended(self, reason: str) -> None:
        """Count a request that ended without an output to read (a client that left mid-stream)."""
        with self._lock:
            self.requests[reason] = self.requests.get(reason, 0) + 1

    def render(self, load: dict) -> str:
        """The Prometheus text format: these totals, then the engine's `Engine.load()`."""
        with self._lock:
            lines = ["# HELP bild_requests_total Requests that ended, by finish reason.",
                     "# TYPE bild_requests_total counter"]
            lines += [f'bild_requests_total{{finish_reason="{r}"}} {n}' for r, n in sorted(self.requests.items())]
            for k, (name, help_) in COUNTERS.items():
                lines += [f"# HELP {name} {help_}", f"# TYPE {name} counter", f"{name} {self.totals[k]}"]
            for k, (name, help_, buckets) in HISTOGRAMS.items():
                lines += [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
                total = 0
                for b, n in zip((*buckets, "+Inf"), self.hist[k]):
                    total += n
                    lines.append(f'{name}_bucket{{le="{b}"}} {total}')
                lines += [f"{name}_sum {self.sums[k]:.6f}", f"{name}_count {total}"]
            lines += ["# HELP bild_verifications_total Verification passes, by how many drafted tokens they kept (the "
                      "histogram of accepted lengths).", "# TYPE bild_verifications_total counter"]
            lines += [f'bild_verifications_total{{accepted="{n}"}} {c}' for n, c in sorted(self.accepted.items())]
        gauges = [("bild_running_requests", "Requests in the running batch.", load["running"]),
                  ("bild_waiting_requests", "Requests waiting for KV blocks or a batch row.", load["waiting"]),
                  ("bild_preempted_requests", "Of the waiting requests, those preempted (waiting to resume).",
                   load["preempted"])]
        gauges += [(f"bild_free_kv_blocks{{model=\"{m}\"}}", "Free blocks of the KV pool, per model.", n)
                   for m, n in load["free_kv_blocks"].items()]
        total = load["kv_cache_blocks"]
        gauges += [(f"bild_kv_cache_usage_ratio{{model=\"{m}\"}}", "Fraction of the KV pool's blocks in use, per "
                    "model (vLLM's kv_cache_usage_perc).", round(1 - n / total, 6) if total else 0.0)
                   for m, n in load["free_kv_blocks"].items()]
        if "prefix_cache" in load:
            pc = load["prefix_cache"]
            gauges.append(("bild_prefix_cache_tokens", "Prompt positions the prefix cache holds.", pc["tokens"]))
            gauges += [("bild_prefix_cache_queries_total", "Prompts looked up in the prefix cache.", pc["queries"],
                        "counter"),
                       ("bild_prefix_cache_hits_total", "Of those, the ones that reused cached positions.", pc["hits"],
                        "counter")]
        seen = set()
        for name, help_, v, *kind in gauges:
            base = name.split("{")[0]
            if base not in seen:
                lines += [f"# HELP {base} {help_}", f"# TYPE {base} {kind[0] if kind else 'gauge'}"]
                seen.add(base)
            lines.append(f"{name} {v}")
        return "\n".join(lines) + "\n"
