"""Prometheus metrics of python/serve.py (GET /metrics): counters and latency histograms of the requests it served,
and the engine's load at the time of the scrape."""
from __future__ import annotations

import threading

# seconds: a CPU's time to first token is ~20 ms for the default pair, a GPU's far less; long answers take seconds
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
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
HISTOGRAMS = {
    "time_to_first_token": ("bild_time_to_first_token_seconds", "From a request's arrival to its first token."),
    "wall_time": ("bild_request_duration_seconds", "From a request's arrival to its end."),
}


class ServiceMetrics:
    """Thread-safe totals over the requests a service saw end."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[str, int] = {}  # finish reason -> count
        self.totals = dict.fromkeys(COUNTERS, 0)
        self.hist = {k: [0] * (len(BUCKETS) + 1) for k in HISTOGRAMS}  # per bucket (the last: +Inf)
        self.sums = dict.fromkeys(HISTOGRAMS, 0.0)

    def observe(self, out) -> None:
        """Count one ended request (a RequestOutput)."""
        m = out.metrics
        with self._lock:
            self.requests[out.finish_reason] = self.requests.get(out.finish_reason, 0) + 1
            for k in COUNTERS:
                self.totals[k] += getattr(m, k)
            for k in HISTOGRAMS:
                if k == "time_to_first_token" and not m.first_token_time:
                    continue  # no token: no time to it
                v = getattr(m, k)
                self.hist[k][next((i for i, b in enumerate(BUCKETS) if v <= b), len(BUCKETS))] += 1
                self.sums[k] += v

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
            for k, (name, help_) in HISTOGRAMS.items():
                lines += [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
                total = 0
                for b, n in zip((*BUCKETS, "+Inf"), self.hist[k]):
                    total += n
                    lines.append(f'{name}_bucket{{le="{b}"}} {total}')
                lines += [f"{name}_sum {self.sums[k]:.6f}", f"{name}_count {total}"]
        gauges = [("bild_running_requests", "Requests in the running batch.", load["running"]),
                  ("bild_waiting_requests", "Requests waiting for KV blocks or a batch row.", load["waiting"]),
                  ("bild_preempted_requests", "Of the waiting requests, those preempted (waiting to resume).",
                   load["preempted"])]
        gauges += [(f"bild_free_kv_blocks{{model=\"{m}\"}}", "Free blocks of the KV pool, per model.", n)
                   for m, n in load["free_kv_blocks"].items()]
        if "prefix_cache" in load:
            gauges.append(("bild_prefix_cache_tokens", "Prompt positions the prefix cache holds.",
                           load["prefix_cache"]["tokens"]))
        seen = set()
        for name, help_, v in gauges:
            base = name.split("{")[0]
            if base not in seen:
                lines += [f"# HELP {base} {help_}", f"# TYPE {base} gauge"]
                seen.add(base)
            lines.append(f"{name} {v}")
        return "\n".join(lines) + "\n"
