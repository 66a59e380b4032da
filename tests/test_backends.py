"""Backend choice is visible and can be forced per call; bad choices fail clearly."""
import pytest
import torch

import bild_kernels
from bild_kernels import backends, verify_draft
from bild_kernels._backend import cpu_extension, triton_available, triton_interpret

OPS = {"write_paged_kv", "reserve_paged_kv", "rollback_paged_kv", "gather_paged_kv", "sample_draft", "verify_draft",
       "apply_penalties", "apply_token_bitmask"}
CPU_OPS = {"cpu_linear", "cpu_linear_int8", "cpu_linear_q8_0", "cpu_linear_q4_1", "cpu_linear_q4_1x16",
           "cpu_linear_q8_0x16", "cpu_linear_q8_0x16_stats", "cpu_decoder_layer", "cpu_rms_norm", "cpu_feature_input",
           "cpu_feature_draft_chain"}  # CPU-only ops: the extension bild_kernels._cpu and a reference


def test_every_op_lists_its_backends():
    table = backends("cpu")
    assert set(table) == OPS | CPU_OPS
    for op, info in table.items():
        assert "ref" in info["implemented"], op
        assert ("triton" in info["implemented"]) == (op in OPS), op
        assert info["default"] in info["usable"]
    x16 = cpu_extension() is not None and torch.ops.bild_kernels_cpu.cpu_linear_q4_1x16_supported()
    assert ("cpu" in table["cpu_linear_q4_1x16"]["implemented"]) == x16  # only where the CPU has AVX-512 VNNI
    assert ("cpu" in table["cpu_linear_q8_0x16"]["implemented"]) == x16
    assert ("cpu" in table["cpu_linear_q8_0x16_stats"]["implemented"]) == x16


def test_cpu_ops_default_to_the_extension(monkeypatch):
    monkeypatch.delenv("BILD_BACKEND", raising=False)
    info = backends("cpu")["cpu_linear"]
    assert info["default"] == ("cpu" if cpu_extension() is not None else "ref")
    assert ("cpu" in info["usable"]) == (cpu_extension() is not None)
    assert backends("cuda")["cpu_linear"]["usable"] == ["ref"]  # the extension never serves CUDA tensors
    monkeypatch.setenv("BILD_BACKEND", "triton")  # a forced backend an op lacks leaves that op's default
    assert backends("cpu")["cpu_linear"]["default"] == info["default"]
    monkeypatch.setenv("BILD_BACKEND", "ref")
    assert backends("cpu")["cpu_linear"]["default"] == "ref"


def test_env_backend_must_be_known(monkeypatch):
    monkeypatch.setenv("BILD_BACKEND", "tpu")
    with pytest.raises(ValueError, match="BILD_BACKEND must be one of"):
        verify_draft(torch.tensor([[1]]), torch.randn(1, 2, 5), "greedy")


def test_cpu_default_follows_triton_interpret(monkeypatch):
    # gather_paged_kv has no CPU-extension backend: Triton under the interpreter, else the reference. Ops with
    # one (verify_draft: its greedy rows) take it first where it is built.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends("cpu")["gather_paged_kv"]["default"] == "triton"
    assert backends("cpu")["verify_draft"]["default"] == ("cpu" if cpu_extension() is not None else "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert backends("cpu")["gather_paged_kv"]["default"] == "ref"
    assert backends("cpu")["verify_draft"]["default"] == ("cpu" if cpu_extension() is not None else "ref")


def test_forced_backends_agree_and_bad_names_fail():
    logits = torch.randn(2, 3, 19)
    draft = torch.tensor([[1, 2], [3, -1]])
    a = verify_draft(draft, logits, "greedy", backend="ref")
    # Triton runs on a GPU, or on the CPU when the process started under TRITON_INTERPRET=1 (the interpreter
    # is chosen when the kernels are defined: setting the variable later does not reach them).
    dev = "cuda" if torch.cuda.is_available() else "cpu" if triton_interpret() else None
    if dev is not None and triton_available():
        b = verify_draft(draft.to(dev), logits.to(dev), "greedy", backend="triton")
        assert torch.equal(a.output_ids, b.output_ids.cpu()) and torch.equal(a.num_accepted, b.num_accepted.cpu())
    with pytest.raises(ValueError, match="backend must be one of"):
        verify_draft(draft, logits, "greedy", backend="tpu")
    with pytest.raises(ValueError, match="cannot run"):
        verify_draft(draft, logits, "greedy", backend="cuda")
    with pytest.raises(ValueError, match="no implementation of gather_paged_kv"):
        bild_kernels.gather_paged_kv(torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8),
                                     torch.zeros(1, 2, dtype=torch.int32), torch.ones(1, dtype=torch.int32),
                                     backend="cpu")
    if cpu_extension() is not None:  # the CPU extension's greedy verification agrees with the reference
        c = verify_draft(draft, logits, "greedy", backend="cpu")
        assert torch.equal(a.output_ids, c.output_ids) and torch.equal(a.num_accepted, c.num_accepted)
    else:
        with pytest.raises(ValueError, match="CPU extension bild_kernels._cpu was not built"):
            verify_draft(draft, logits, "greedy", backend="cpu")


def test_backends_reports_a_forced_backend_that_cannot_run(monkeypatch):
    # backends() describes; it does not raise: where BILD_BACKEND names a backend that cannot run an op on the
    # device (the CUDA extension on CPU tensors), that op's default is None and the reason is given.
    monkeypatch.setenv("BILD_BACKEND", "cuda")
    info = backends("cpu")["verify_draft"]
    assert info["default"] is None and "cannot run verify_draft on cpu" in info["error"]
    assert backends("cpu")["cpu_linear"]["default"] in ("cpu", "ref")  # it has no cuda backend: its default stays
    with pytest.raises(ValueError, match="BILD_BACKEND='cuda' cannot run verify_draft on cpu"):
        verify_draft(torch.tensor([[1]]), torch.randn(1, 2, 5), "greedy")


def test_env_forces_default(monkeypatch):
    monkeypatch.setenv("BILD_BACKEND", "ref")
    assert backends("cpu")["sample_draft"]["default"] == "ref"


def test_version():
    assert bild_kernels.__version__


def test_trusted_inputs_skips_value_checks_only():
    # The engine's own steps run inside trusted_inputs(): value checks (each a device read, a host sync on a
    # GPU) are skipped there; shape, dtype and device checks are not, and the checks come back on leaving.
    from bild_kernels.ops import trusted_inputs
    logits, bad_ids = torch.randn(1, 3, 5), torch.tensor([[1, 7]])  # 7 is outside the vocabulary of 5
    with pytest.raises(ValueError, match="outside the vocabulary"):
        verify_draft(bad_ids, logits, "greedy", backend="ref")
    with trusted_inputs():
        verify_draft(torch.tensor([[1, 2]]), logits, "bild", rollback_threshold=-1.0, backend="ref")  # unchecked
        with pytest.raises(ValueError, match="draft_ids must have shape"):
            verify_draft(torch.tensor([[1]]), logits, "greedy", backend="ref")
        with pytest.raises(TypeError, match="draft_ids must have dtype"):
            verify_draft(torch.tensor([[1.0, 2.0]]), logits, "greedy", backend="ref")
    with pytest.raises(ValueError, match="rollback_threshold must be >= 0"):
        verify_draft(torch.tensor([[1, 2]]), logits, "bild", rollback_threshold=-1.0, backend="ref")
