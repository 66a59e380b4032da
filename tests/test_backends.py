"""Backend choice is visible and can be forced per call; bad choices fail clearly."""
import pytest
import torch

import bild_kernels
from bild_kernels import backends, verify_draft

OPS = {"write_paged_kv", "reserve_paged_kv", "rollback_paged_kv", "gather_paged_kv", "sample_draft", "verify_draft"}


def test_every_op_lists_its_backends():
    table = backends("cpu")
    assert set(table) == OPS
    for op, info in table.items():
        assert "ref" in info["implemented"] and "triton" in info["implemented"], op
        assert info["default"] in info["usable"]


def test_cpu_default_follows_triton_interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends("cpu")["verify_draft"]["default"] == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert backends("cpu")["verify_draft"]["default"] == "ref"


def test_forced_backends_agree_and_bad_names_fail(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    logits = torch.randn(2, 3, 19)
    draft = torch.tensor([[1, 2], [3, -1]])
    a = verify_draft(draft, logits, "greedy", backend="ref")
    b = verify_draft(draft, logits, "greedy", backend="triton")
    assert torch.equal(a.output_ids, b.output_ids) and torch.equal(a.num_accepted, b.num_accepted)
    with pytest.raises(ValueError, match="backend must be one of"):
        verify_draft(draft, logits, "greedy", backend="tpu")
    with pytest.raises(ValueError, match="cannot run"):
        verify_draft(draft, logits, "greedy", backend="cuda")


def test_env_forces_default(monkeypatch):
    monkeypatch.setenv("BILD_BACKEND", "ref")
    assert backends("cpu")["sample_draft"]["default"] == "ref"


def test_version():
    assert bild_kernels.__version__
