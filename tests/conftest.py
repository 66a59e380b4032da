"""Shared fixtures: deterministic seeds, the backends to test, and the GPU skip marker."""
import importlib
import os
import sys
import threading
from pathlib import Path

import pytest
import torch

from bild_kernels._backend import cuda_extension, triton_available

HAS_GPU = torch.cuda.is_available()
requires_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU (none on this machine)")


def kernel_backends(first_passes: bool = False, cpu: bool = False):
    """Backends whose kernels can run here, as (backend, device) pytest params.

    Triton runs on the GPU, or on the CPU under TRITON_INTERPRET=1; CUDA needs a GPU and the built
    extension. Backends that cannot run are still listed, skipped with the reason. With `first_passes`,
    CUDA (whose default first pass over the vocabulary, "auto", picks per launch) also runs with each first pass
    forced ("cuda-chunked", "cuda-wide", "cuda-stream", "cuda-long": sample_draft and verify_draft) and with each
    top-k / top-p cut-off search forced ("cuda-split", "cuda-block": "auto" picks per launch) and with the fused tail
    ("cuda-fused": it applies where the rows hint allows, csrc/common.cuh use_fused_tail);
    with `cpu`, the CPU extension's backend too (the ops with one beside those of CPU_EXTENSION_OPS).
    """
    params = []
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    if HAS_GPU:
        params.append(pytest.param(("triton", "cuda"), id="triton-cuda"))
    elif interp:
        params.append(pytest.param(("triton", "cpu"), id="triton-interp"))
    else:
        params.append(pytest.param(("triton", "cpu"), id="triton",
                                   marks=pytest.mark.skip(reason="no GPU and TRITON_INTERPRET is not 1")))
    if not triton_available():
        params[-1] = pytest.param(("triton", "cpu"), id="triton", marks=pytest.mark.skip(reason="triton missing"))
    cuda_ok = HAS_GPU and cuda_extension() is not None
    why = "needs a CUDA GPU" if not HAS_GPU else "bild_kernels._C was not built"
    params.append(pytest.param(("cuda", "cuda"), id="cuda",
                               marks=[] if cuda_ok else pytest.mark.skip(reason=why)))
    if first_passes:
        for kind in ("chunked", "wide", "stream", "long", "split", "block", "fused"):
            params.append(pytest.param(("cuda", "cuda", kind), id=f"cuda-{kind}",
                                       marks=[] if cuda_ok else pytest.mark.skip(reason=why)))
    if cpu:
        from bild_kernels._backend import cpu_extension
        params.append(pytest.param(("cpu", "cpu"), id="cpu", marks=[] if cpu_extension() is not None else
                                   pytest.mark.skip(reason="bild_kernels._cpu was not built or needs AVX2/FMA")))
    return params


def _backend_device(request):
    backend, device, *setting = request.param
    if not setting:
        yield backend, device
        return
    from bild_kernels import cuda_cut_search, cuda_first_pass, cuda_fused_tail
    # "split" / "block": the cut-off search, "fused": the fused tail, else a first pass
    choose = (cuda_cut_search if setting[0] in ("split", "block") else
              cuda_fused_tail if setting[0] == "fused" else cuda_first_pass)
    old = choose(setting[0])
    try:
        yield backend, device
    finally:
        choose(old)


@pytest.fixture(params=kernel_backends())
def backend_device(request):
    yield from _backend_device(request)


@pytest.fixture(params=kernel_backends(first_passes=True, cpu=True))
def backend_device_passes(request):
    """backend_device, plus CUDA with each first pass forced and the CPU extension's backend (the ops that have
    both: sample_draft, verify_draft)."""
    yield from _backend_device(request)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long statistical or soak runs, outside the default test command")


PYTHON = Path(__file__).resolve().parent.parent / "python"  # python/: the service and tools, not a package


@pytest.fixture(scope="module")
def programs():
    """python/'s serve, load_test and tiny_pair modules, imported."""
    sys.path.insert(0, str(PYTHON))
    try:
        yield {m: importlib.import_module(m) for m in ("serve", "load_test", "tiny_pair")}
    finally:
        sys.path.remove(str(PYTHON))


@pytest.fixture(scope="module")
def server(programs, tmp_path_factory):
    """python/serve.py's server on a tiny pair saved to disk (float64, 64 positions, prefills in chunks of 4)."""
    serve = programs["serve"]
    large, small = programs["tiny_pair"].save_tiny_pair(tmp_path_factory.mktemp("pair"))
    args = serve.parser().parse_args(["--large", str(large), "--small", str(small), "--dtype", "float64",
                                      "--max-batch-size", "4", "--max-model-len", "64", "--port", "0",
                                      "--prefill-chunk", "4"])  # (a chat prompt's prefill then takes chunks)
    srv = serve.make_server(serve.build_engine(args), port=0, max_pending=64)
    assert srv.service.engine.prefill_chunk == 4
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def json_server(programs):
    """A server on a tiny pair whose tokenizer can write JSON (tests/engine/test_structured_outputs.py's pieces: no
    "_", so the functions' names are letters), with a chat template that shows whether it was given tools."""
    import torch

    from bild_kernels import Engine

    from .engine.conftest import shallow_copy, tiny_llama
    from .engine.test_structured_outputs import EOS, V, _tokenizer
    large = tiny_llama(21, layers=3, vocab=V)
    large.config.eos_token_id = EOS
    small = shallow_copy(large, layers=2, noise=0.3)
    small.config.eos_token_id = EOS
    tok = _tokenizer()
    tok.chat_template = "{% if tools %}yes{% else %}no{% endif %}"  # (the whole text is one piece)
    engine = Engine(large=large, small=small, tokenizer=tok, dtype=torch.float64, max_model_len=96, block_size=4)
    srv = programs["serve"].make_server(engine, port=0, max_pending=16)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()
