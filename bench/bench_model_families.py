"""Benchmark the executor's layer forms on a CPU: a decode step of a random model of each family at its real small
model's layer shapes, run through the CPU extension's one-call layer (`cpu_decoder_layer`, "fused") and through
PyTorch ops around the extension's products and attention ("ops": what Gemma's and Qwen3's layers ran as before the
fused layer took their forms), interleaved on the same engine.

Shapes (vocabulary cut to 8,192 so that the head does not hide the layers): llama = SmolLM2-135M (hidden 576, 9 / 3
heads of 64, intermediate 1536, 30 layers), qwen3 = Qwen3-0.6B (hidden 1024, 16 / 8 heads of 128, intermediate 3072,
28 layers), gemma3 = Gemma 3 270M (hidden 640, 4 / 1 heads of 256, intermediate 2048, 18 layers, five sliding layers
of 512 tokens to a full one); float32 weights (--int8: int8, as `Engine(large_weights="int8")` loads them). Prints
tokens/s of LargeOnly() at batch 1 for each family and path and the ratio; the tokens of both paths are compared.

  python bench/bench_model_families.py [--families llama,qwen3,gemma3] [--tokens 48] [--repeat 5] [--threads 2]
"""
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import append_rows, device_name, git_rev, parser  # noqa: E402

from bild_kernels import Engine, LargeOnly, SamplingParams  # noqa: E402

COMMON = dict(vocab_size=8192, max_position_embeddings=4096, eos_token_id=None, bos_token_id=None, pad_token_id=None)
SHAPES = {
    "llama": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3, head_dim=64, tie_word_embeddings=True),
    "qwen3": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "gemma3": dict(hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
                   num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512),
}


def model(family: str, layers: int | None):
    import transformers
    shape = dict(SHAPES[family], **({"num_hidden_layers": layers} if layers else {}))
    if family == "gemma3":
        n = shape["num_hidden_layers"]
        shape["layer_types"] = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]
    cls = {"llama": transformers.LlamaConfig, "qwen3": transformers.Qwen3Config,
           "gemma3": transformers.Gemma3TextConfig}[family]
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cls(**shape, **COMMON)).float().eval()


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--families", default="llama,qwen3,gemma3")
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--repeat", type=int, default=5, help="timed runs of each path (after one warm-up each)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, default=None, help="fewer layers than the real model's (a quick check)")
    p.add_argument("--int8", action="store_true", help="int8 weights (Engine(large_weights='int8'))")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    families = args.families.split(",")
    if unknown := [f for f in families if f not in SHAPES]:
        p.error(f"unknown families {unknown}; choose from {', '.join(SHAPES)}")
    rows = []
    for family in families:
        engine = Engine(large=model(family, args.layers), dtype=torch.float32, max_model_len=512, block_size=16,
                        large_weights="int8" if args.int8 else None)
        ex = engine.runners["large"].executor
        fused = ex._fused
        if fused is None:
            p.error("the CPU extension's fused layer does not run here (bild_kernels._cpu not built, or no AVX2/FMA)")
        prompt, params = list(range(10, 42)), SamplingParams(max_tokens=args.tokens)
        speed, tokens = {"fused": [], "ops": []}, {}
        for i in range(args.repeat + 1):
            for path in ("fused", "ops"):
                ex._fused = fused if path == "fused" else None
                t = time.perf_counter()
                (out,) = engine.generate([prompt], params, policy=LargeOnly())
                if i:  # the first of each is a warm-up
                    speed[path].append(args.tokens / (time.perf_counter() - t))
                tokens.setdefault(path, out.token_ids)
        ex._fused = fused
        f, o = statistics.median(speed["fused"]), statistics.median(speed["ops"])
        same = tokens["fused"] == tokens["ops"]
        print(f"{family:<7} {'int8' if args.int8 else 'float32'} layers={ex.config.num_layers}: fused {f:.1f} tokens/s, "
              f"ops {o:.1f} tokens/s, fused/ops {f / o:.2f}x, same tokens: {same}", flush=True)
        rows.append({"device": device_name("cpu"), "rev": git_rev(), "family": family,
                     "weights": "int8" if args.int8 else "float32", "layers": ex.config.num_layers,
                     "threads": args.threads, "tokens": args.tokens, "repeat": args.repeat,
                     "fused_tok_s": round(f, 2), "ops_tok_s": round(o, 2), "ratio": round(f / o, 3),
                     "same_tokens": same})
    if not args.no_save:
        append_rows("model_families.csv", rows)


if __name__ == "__main__":
    main()
