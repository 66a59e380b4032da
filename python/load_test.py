"""Bounded load test of python/serve.py over loopback: C concurrent clients send M requests (half of them
streamed); every response must equal the same request served alone. Latency percentiles, time to first
token and throughput are printed and appended to bench/results/serve_load_<date>.csv.

    python python/load_test.py --tiny --clients 16 --requests 400     # in-process server on a tiny pair
    python python/load_test.py --url http://127.0.0.1:8000 --clients 8 --requests 100 --no-token-prompts
    python python/load_test.py --tiny --ssl-certfile tests/tls/server.pem --ssl-keyfile tests/tls/server.key \
        --cafile tests/tls/ca.pem                                      # the same over HTTPS

Exit status 1 if any response differs from its reference or fails.
"""
from __future__ import annotations

import argparse
import http.client
import json
import random
import ssl
import sys
import threading
import time
import urllib.parse
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # run from a checkout
from _report import dated, percentile, run_info, write_csv  # noqa: E402

POLICY_MIX = [None, {"name": "greedy", "max_draft_len": 4}, {"name": "large-only"},
              {"name": "bild", "fallback_threshold": 0.5, "rollback_threshold": 0.0},
              {"name": "bild", "fallback_threshold": 0.4, "rollback_threshold": 2.0, "max_draft_len": 5},
              {"name": "speculative-sampling", "max_draft_len": 3}, {"name": "jacobi", "block_size": 4},
              {"name": "shallow-deep", "exit_layer": 2}, {"name": "ngram", "max_draft_len": 4},
              {"name": "greedy", "max_draft_len": 2, "lookup": {"max_draft_len": 4, "min_ngram": 1}}]


def request_mix(n: int, seed: int = 0, *, vocab: int = 96, token_prompts: bool = True, max_tokens: int = 24,
                policies=POLICY_MIX) -> list[dict]:
    """n distinct completion bodies: text and token-id prompts, greedy and seeded sampling (min-p on about a third of
    the sampled ones), every policy, penalties on about a third of them (not SmallOnly's, which refuses them), an
    output constraint (a regex or choices, ended by stop id 95) on about a fifth of the others."""
    rng = random.Random(seed)
    extra = random.Random(seed + 1)  # (the penalties' own draws: the bodies are otherwise what they always were)
    more = random.Random(seed + 2)  # (and min-p's)
    guided = random.Random(seed + 3)  # (and the output constraints')
    bodies = []
    for i in range(n):
        policy = policies[i % len(policies)]
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 12))]
        body = {"prompt": ids if token_prompts and rng.random() < 0.5 else " ".join(f"w{t}" for t in ids),
                "max_tokens": rng.randint(1, max_tokens), "seed": rng.randrange(10**6)}
        if policy is not None:
            body["policy"] = policy
        if policy is None or policy["name"] in ("speculative-sampling", "large-only", "bild", "ngram"):
            if rng.random() < 0.5:
                body |= {"temperature": rng.choice([0.7, 1.0]), "top_p": rng.choice([1.0, 0.9])}
                if more.random() < 0.35:
                    body["min_p"] = more.choice([0.05, 0.2])
        if (policy is None or policy["name"] != "small-only") and extra.random() < 0.35:
            body |= {"repetition_penalty": extra.choice([1.0, 1.3]), "frequency_penalty": extra.choice([0.0, 0.7]),
                     "presence_penalty": extra.choice([0.0, -0.5]),
                     "min_tokens": extra.randint(0, body["max_tokens"])}
        if (policy is None or policy["name"] != "small-only") and not body.get("min_tokens") and guided.random() < 0.2:
            body |= guided.choice([{"guided_regex": "( w[1-9]){1,5}"},
                                   {"guided_choice": [" w7 w8", " w9", " w3 w3 w3"]}])
            body["stop"] = [95]
        bodies.append(body)
    return bodies


def complete(url: str, body: dict, stream: bool, timeout: float = 600.0, tls: ssl.SSLContext | None = None) -> dict:
    """POST one request (an https URL: over TLS, `tls` the client's context, else the system's trust);
    {"token_ids", "text", "finish_reason", "error", "latency_s", "ttft_s", "status"}."""
    u = urllib.parse.urlsplit(url)
    conn = (http.client.HTTPSConnection(u.hostname, u.port, timeout=timeout, context=tls) if u.scheme == "https"
            else http.client.HTTPConnection(u.hostname, u.port, timeout=timeout))
    t0 = time.perf_counter()
    try:
        data = json.dumps(body | {"stream": stream}).encode()
        conn.request("POST", "/v1/completions", data, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        res = {"status": resp.status, "token_ids": [], "text": "", "finish_reason": None, "error": None,
               "ttft_s": None}
        if resp.status != 200 or not stream:
            obj = json.loads(resp.read())
            if resp.status != 200:
                res["error"] = obj.get("error", {}).get("message")
            else:
                c = obj["choices"][0]
                res |= {"token_ids": c["token_ids"], "text": c["text"], "finish_reason": c["finish_reason"],
                        "error": c.get("error")}
        else:
            for raw in resp:
                line = raw.decode().rstrip("\r\n")
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    break
                ev = json.loads(line[6:])
                if "error" in ev:
                    res["error"] = ev["error"]["message"]
                    break
                c = ev["choices"][0]
                if c["token_ids"] and res["ttft_s"] is None:
                    res["ttft_s"] = time.perf_counter() - t0
                res["token_ids"] += c["token_ids"]
                res["text"] += c["text"]
                if c["finish_reason"]:
                    res["finish_reason"], res["error"] = c["finish_reason"], c.get("error")
        res["latency_s"] = time.perf_counter() - t0
        return res
    finally:
        conn.close()


def run_load(url: str, bodies: list[dict], *, clients: int, requests: int, seed: int = 0,
             reference: list[dict] | None = None, tls: ssl.SSLContext | None = None) -> dict:
    """Serve every body alone first (the reference), then `requests` draws from them by `clients` threads (each
    request on a new connection: over TLS, a handshake each)."""
    if reference is None:
        reference = [complete(url, b, stream=False, tls=tls) for b in bodies]
    failures: list[str] = [f"body {k} fails alone: {r['status']} {r['error']!r}"
                           for k, r in enumerate(reference) if r["status"] != 200 or r["error"]]
    rng = random.Random(seed)
    plan = [(rng.randrange(len(bodies)), rng.random() < 0.5) for _ in range(requests)]
    results: list[dict | None] = [None] * requests
    nxt = iter(range(requests))
    lock = threading.Lock()

    def client():
        while True:
            with lock:
                i = next(nxt, None)
            if i is None:
                return
            k, stream = plan[i]
            try:
                results[i] = complete(url, bodies[k], stream, tls=tls)
            except Exception as e:  # counted as a failure below
                with lock:
                    failures.append(f"request {i}: {type(e).__name__}: {e}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    mismatches = 0
    for i, (k, stream) in enumerate(plan):
        r, ref = results[i], reference[k]
        if r is None:
            continue
        if r["status"] != 200 or r["error"] or r["token_ids"] != ref["token_ids"] or r["text"] != ref["text"]:
            mismatches += 1
            if len(failures) < 10:
                failures.append(f"request {i} (body {k}, stream={stream}): got {r['token_ids']} {r['error']!r}, "
                                f"alone {ref['token_ids']}")
    done = [r for r in results if r is not None]
    lat = [r["latency_s"] * 1e3 for r in done]
    ttft = [r["ttft_s"] * 1e3 for r in done if r["ttft_s"] is not None]
    toks = sum(len(r["token_ids"]) for r in done)
    row = {"clients": clients, "requests": requests, "distinct": len(bodies), "completed": len(done),
           "mismatches": mismatches + (requests - len(done)), "wall_s": round(wall, 3),
           "req_per_s": round(len(done) / wall, 2), "tokens_per_s": round(toks / wall, 1)}
    for name, xs in (("latency", lat), ("ttft", ttft)):
        for q in (50, 90, 99):
            row[f"{name}_p{q}_ms"] = round(percentile(xs, q), 2) if xs else None
    return {"row": row, "failures": failures, "reference": reference}


def tiny_server(dtype: str = "float64", max_batch_size: int = 8, device: str = "cpu",
                tls: ssl.SSLContext | None = None):
    """An in-process server on the tiny pair (python/tiny_pair.py), over HTTPS with a server-side `tls`; returns
    (server, url)."""
    import torch

    from bild_kernels import Engine
    from serve import make_server
    from tiny_pair import tiny_models, tokenizer
    large, small = tiny_models(getattr(torch, dtype))
    engine = Engine(large=large, small=small, device=device, dtype=getattr(torch, dtype), max_batch_size=max_batch_size,
                    max_model_len=128, block_size=8, tokenizer=tokenizer())
    server = make_server(engine, ssl_context=tls)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="a running python/serve.py")
    src.add_argument("--tiny", action="store_true", help="start an in-process server on a tiny random pair")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--distinct", type=int, default=64, help="distinct request bodies the load draws from")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--dtype", default="float64", help="--tiny: the pair's dtype")
    ap.add_argument("--max-batch-size", type=int, default=8, help="--tiny: the engine's batch")
    ap.add_argument("--device", default="cpu", help="--tiny: where the engine runs (cuda: measure bf16 divergence)")
    ap.add_argument("--no-token-prompts", action="store_true", help="text prompts only (any tokenizer)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cafile", default=None, help="an https URL's CA certificates (PEM; default: the system's)")
    ap.add_argument("--ssl-certfile", default=None, help="--tiny: serve HTTPS with this certificate (and key file)")
    ap.add_argument("--ssl-keyfile", default=None)
    ap.add_argument("--out", default=None, help="CSV to append to (default bench/results/serve_load_<date>.csv)")
    args = ap.parse_args(argv)
    server = None
    client_tls = ssl.create_default_context(cafile=args.cafile) if args.cafile else None
    if args.tiny:
        tls = None
        if args.ssl_certfile:
            tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls.load_cert_chain(args.ssl_certfile, args.ssl_keyfile)
        server, url = tiny_server(args.dtype, args.max_batch_size, args.device, tls)
    else:
        url = args.url
    try:
        bodies = request_mix(args.distinct, args.seed, token_prompts=not args.no_token_prompts,
                             max_tokens=args.max_tokens)
        res = run_load(url, bodies, clients=args.clients, requests=args.requests, seed=args.seed, tls=client_tls)
    finally:
        if server is not None:
            server.shutdown()
    server_name = f"tiny-{args.device}-{args.dtype}{'-https' if url.startswith('https') else ''}"
    row = run_info() | {"server": server_name if args.tiny else url} | res["row"]
    path = write_csv(args.out or dated("serve_load"), [row])
    print(" ".join(f"{k}={v}" for k, v in res["row"].items()))
    for f in res["failures"]:
        print("FAIL", f, file=sys.stderr)
    print(f"wrote {path}", file=sys.stderr)
    return 1 if res["row"]["mismatches"] or res["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
