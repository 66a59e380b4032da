"""Every benchmark script runs at CPU-sized shapes and prints its rows (nothing saved): a benchmark that
breaks is found by the test command, not by the next GPU session."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
OPS = ["write_paged_kv", "rollback_paged_kv", "gather_paged_kv", "sample_draft", "verify_draft", "paged_attention",
       "apply_penalties", "apply_token_bitmask"]


def _run(script: str, *args: str) -> list[str]:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(BENCH / script), "--no-save", *args], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.splitlines()


def test_every_op_has_a_benchmark():
    assert sorted(p.stem[len("bench_"):] for p in BENCH.glob("bench_*.py")) == sorted(
        OPS + ["e2e", "draft_weights", "cpu_linear", "cpu_decoder_layer", "cpu_feature_draft", "sampled_decoding",
               "bulk", "prefill_chunks", "model_families", "kv_admission", "priority"])


@pytest.mark.parametrize("op", OPS)
def test_op_benchmark_prints_rows(op):
    # "<op> <backend> <config> median <us> us [p20 .., p80 ..] <GB/s>": the reference and Triton (interpreted)
    rows = [line.split() for line in _run(f"bench_{op}.py") if " median " in line]
    assert {r[1] for r in rows} >= {"ref", "triton"}
    from bild_kernels._backend import cpu_extension
    if (op in ("paged_attention", "sample_draft", "verify_draft", "apply_penalties", "apply_token_bitmask")
            and cpu_extension() is not None):
        # bild_kernels._cpu's too
        assert "cpu" in {r[1] for r in rows}
    assert all(r[0].endswith(op.split("_", 1)[1]) and float(r[r.index("median") + 1]) > 0 for r in rows)


def test_e2e_benchmark_compares_draft_loops():
    rows = [ast.literal_eval(line) for line in _run("bench_e2e.py", "--pair", "tiny", "--tokens", "4", "--prompts",
                                                    "2", "--batch-sizes", "2", "--no-hf", "--draft-loops",
                                                    "eager,static") if line.startswith("{")]
    systems = [r["system"] for r in rows]
    assert systems[:2] == ["engine large-only (eager)", "engine large-only (static)"]
    assert "engine bild (static)" in systems
    assert all(r["tokens_per_s"] > 0 for r in rows)


def test_sampled_decoding_benchmark_runs_the_default_pair():
    lines = [line.split() for line in _run("bench_sampled_decoding.py", "--prompts", "1", "--max-tokens", "4",
                                           "--draft-lens", "2", "--threads", "1", "--reference-verify")
             if "tokens/s" in line]
    assert [r[0] for r in lines] == ["large-only", "speculative-sampling(2)"]
    assert all(float(r[1]) > 0 for r in lines) and lines[0][3] == "1.00x"


def test_bulk_benchmark_compares_batch_generation_with_hf_generate():
    lines = [line.split() for line in _run("bench_bulk.py", "--model", "tiny", "--batch-sizes", "1,3", "--tokens", "4")]
    rates = [r for r in lines if "tokens/s," in r]
    assert [(r[1], r[2]) for r in rates] == [("B=1", "bild:"), ("B=1", "hf:"), ("B=3", "bild:"), ("B=3", "hf:")]
    assert sum("bild / hf:" in " ".join(r) for r in lines) == 2


def test_draft_weights_benchmark_times_every_format():
    rows = [line.split() for line in _run("bench_draft_weights.py", "--iters", "2", "--flush-mb", "8", "--layers", "1",
                                          "--hidden", "64", "--intermediate", "128", "--kv-width", "32",
                                          "--head", "97") if " median " in line]
    assert sorted((r[1], r[2]) for r in rows) == sorted((f, f"cache={c}") for f in ("float32", "bfloat16", "int8")
                                                        for c in ("warm", "cold"))
    assert all(float(r[r.index("median") + 1]) > 0 for r in rows)


def test_cpu_linear_benchmark_compares_with_reference():
    from bild_kernels._backend import cpu_extension
    if cpu_extension() is None:
        pytest.skip("bild_kernels._cpu not built, or this CPU lacks AVX2/FMA")
    lines = _run("bench_cpu_linear.py", "--shapes", "576x576", "--rows", "1,3", "--iters", "2")
    rows = [line.split() for line in lines if " median " in line]
    fp32 = [r for r in rows if r[0] == "cpu_linear"]
    assert sorted((r[1], next(t for t in r if t.startswith("M="))) for r in fp32) == [
        ("cpu", "M=1"), ("cpu", "M=3"), ("ref", "M=1"), ("ref", "M=3")]
    assert sorted(r[1] for r in rows if r[0] == "cpu_linear_int8") == ["cpu", "cpu", "torch-bf16", "torch-bf16"]
    assert sorted(r[1] for r in rows if r[0] == "cpu_linear_q4_1") == ["cpu-f32", "cpu-f32", "cpu-q4_1", "cpu-q4_1"]
    assert any(line.strip().startswith("M=3: cpu") and "ref/cpu" in line for line in lines)
    assert any(line.strip().startswith("M=3: q4_1") and "f32/q4_1" in line for line in lines)
    import torch
    x16 = torch.ops.bild_kernels_cpu.cpu_linear_q4_1x16_supported()
    assert sorted(r[1] for r in rows if r[0] == "cpu_linear_q4_1x16") == (["cpu", "cpu", "cpu-i8", "cpu-i8"] if x16
                                                                          else [])
    assert sorted(r[1] for r in rows if r[0] == "cpu_linear_q8_0x16") == (["cpu", "cpu"] if x16 else [])  # the draft's
    assert any(line.strip().startswith("M=3: q4_1") and "q4_1/x16" in line and "x16i8" in line for line in lines) == x16


def test_cpu_decoder_layer_benchmark_compares_with_reference():
    from bild_kernels._backend import cpu_extension
    if cpu_extension() is None:
        pytest.skip("bild_kernels._cpu not built, or this CPU lacks AVX2/FMA")
    lines = _run("bench_cpu_decoder_layer.py", "--rows", "1,3", "--layers", "2", "--iters", "2")
    rows = [line.split() for line in lines if " median " in line]
    import torch
    packed = ["q4_1x16", "q4_1x16i8", "int8x16"] if torch.ops.bild_kernels_cpu.cpu_linear_q4_1x16_supported() else []
    assert sorted((r[1], r[2], r[4]) for r in rows) == sorted(
        [(b, f"weights={w}", f"T={t}") for b in ("cpu", "ref", "torch-ops")
         for w in ("float32", "float32+qk_norm", "float32+gemma", "int8") for t in (1, 3)]
        + [(b, "weights=q4_1", f"T={t}") for b in ("cpu", "ref") for t in (1, 3)]  # Q4_1: no torch-ops twin
        + [("cpu", f"weights={w}", f"T={t}") for w in packed for t in (1, 3)])  # packed: the kernel alone
    assert sum("torch-ops/cpu" in line for line in lines) == 8
    assert sum("float32 (Llama's form)/float32+" in line for line in lines) == 4
    assert sum("(float activations)/" in line for line in lines) == 2 * len(packed)


def test_model_families_benchmark_compares_the_fused_layer_with_pytorch_ops():
    from bild_kernels._backend import cpu_extension
    if cpu_extension() is None:
        pytest.skip("bild_kernels._cpu not built, or this CPU lacks AVX2/FMA")
    lines = _run("bench_model_families.py", "--layers", "2", "--tokens", "4", "--repeat", "1", "--threads", "1")
    assert [line.split()[0] for line in lines] == ["llama", "qwen3", "gemma3"]
    assert all("fused/ops" in line and "layers=2" in line and "same tokens: True" in line for line in lines)


def test_cpu_feature_draft_benchmark_compares_with_reference():
    from bild_kernels._backend import cpu_extension
    if cpu_extension() is None:
        pytest.skip("bild_kernels._cpu not built, or this CPU lacks AVX2/FMA")
    lines = _run("bench_cpu_feature_draft.py", "--steps", "2", "--iters", "2")
    rows = [line.split() for line in lines if " median " in line]
    import torch
    forms = ["float32", "int8"] + (["int8x16"] if torch.ops.bild_kernels_cpu.cpu_linear_q4_1x16_supported() else [])
    assert sorted((r[1], r[2]) for r in rows) == sorted((b, f"weights={w}") for b in ("cpu", "pieces", "ref")
                                                         for w in forms)
    assert sum("pieces/cpu" in line for line in lines) == len(forms)


def test_step_profile_prints_where_the_time_goes():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(BENCH / "profile_step.py"), "--pair", "tiny", "--policy", "bild",
                           "--passes", "static", "--tokens", "4", "--rows", "5"], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Self CPU time total" in proc.stdout
    assert "bild (static), batch 1: 4 tokens in" in proc.stdout.splitlines()[-1]


def test_prefill_chunks_benchmark_compares_chunked_and_whole_prefills():
    lines = _run("bench_prefill_chunks.py", "--pair", "tiny", "--prompt-tokens", "120", "--chunks", "16,0",
                 "--decode-tokens", "16")
    rows = [ast.literal_eval(line) for line in lines if line.startswith("{")]
    assert [(r["prefill_chunk"], r["chunks"]) for r in rows] == [(16, 7), (0, 0)]
    assert all(r["max_gap_ms"] > 0 and r["long_ttft_ms"] > 0 for r in rows)


def test_kv_admission_benchmark_compares_reserving_with_preempting():
    lines = _run("bench_kv_admission.py", "--pair", "tiny", "--prompts", "6", "--max-tokens", "24", "--max-model-len",
                 "64", "--batch", "4")
    rows = [ast.literal_eval(line) for line in lines if line.startswith("{")]
    assert [r["kv_admission"] for r in rows] == ["reserve", "preempt-swap", "preempt-recompute"]
    reserve, swap, recompute = rows
    # the pool holds two of the longest prompt's worst cases: reserving runs two or three at a time and never
    # preempts; preempting runs all four
    assert reserve["max_running"] in (2, 3) and reserve["preemptions"] == 0
    assert swap["max_running"] == recompute["max_running"] == 4 and swap["preemptions"] > 0
    assert all(r["tokens"] == 6 * 24 and r["tokens_per_s"] > 0 for r in rows)
    assert any(line.startswith("preempt-swap / reserve: ") for line in lines)


def test_priority_benchmark_times_an_interactive_request_beside_a_batch_job():
    lines = _run("bench_priority.py", "--pair", "tiny", "--background", "5", "--batch", "2", "--max-tokens", "48",
                 "--probe-tokens", "8")
    rows = [ast.literal_eval(line) for line in lines if line.startswith("{")]
    assert [r["probe_priority"] for r in rows] == [10, 0]
    fcfs, first = rows
    assert fcfs["preemptions"] == 0 and first["preemptions"] >= 1  # priority 0 preempted a job request to get in
    assert all(r["probe_tokens"] == 8 and r["probe_ttft_ms"] > 0 for r in rows)
