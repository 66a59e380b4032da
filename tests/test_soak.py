"""python/soak.py: a short smoke run in the default suite, the full >= 10,000-request soak as `slow`."""
import importlib
import sys
from pathlib import Path

import pytest
import torch

PYTHON = Path(__file__).resolve().parent.parent / "python"


@pytest.fixture(scope="module")
def soak():
    sys.path.insert(0, str(PYTHON))
    try:
        yield importlib.import_module("soak"), importlib.import_module("tiny_pair")
    finally:
        sys.path.remove(str(PYTHON))


def test_soak_smoke(soak):
    soak, tiny = soak
    from bild_kernels import Engine
    large, small = tiny.tiny_models(torch.float64)
    eng = Engine(large=large, small=small, dtype=torch.float64, max_batch_size=4, max_model_len=64, block_size=4,
                 kv_cache_blocks=24)
    res = soak.run_soak(eng, requests=160, threads=4, window=40, pool_size=16, log=lambda *_: None)
    s = res["summary"]
    assert s["requests"] == 160 and len(res["windows"]) == 4
    assert s["mismatches"] == s["exceptions"] == s["leaked_blocks"] == s["in_flight_at_end"] == 0, res["details"]
    assert s["invariants"] == "ok"


@pytest.mark.slow
def test_soak_full(soak, tmp_path):
    assert soak[0].main(["--out", str(tmp_path / "soak.csv")]) == 0
