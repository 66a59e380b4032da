"""Registers the CPU extension (bild_kernels._cpu) as the "cpu" backend of the ops it implements, with the
fake (meta) implementations that let torch.compile trace through them."""
import torch

from bild_kernels._backend import CPU_EXTENSION_OPS, register


@torch.library.register_fake("bild_kernels_cpu::cpu_linear")
def _cpu_linear_fake(x, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.register_fake("bild_kernels_cpu::cpu_linear_int8")
def _cpu_linear_int8_fake(x, qweight, scale, bias):
    return x.new_empty((x.shape[0], qweight.shape[0]))


@torch.library.register_fake("bild_kernels_cpu::paged_attention")
def _paged_attention_fake(query, key_cache, value_cache, query_start_loc, positions, block_tables, context_lens,
                          scale, sliding_window):
    return query.new_empty(query.shape)


@torch.library.register_fake("bild_kernels_cpu::cpu_decoder_layer")
def _cpu_decoder_layer_fake(x, *args):
    return x.new_empty(x.shape)


for _op in ("reserve_paged_kv", "rollback_paged_kv"):  # in place: their fakes return nothing
    torch.library.register_fake(f"bild_kernels_cpu::{_op}")(lambda *args: None)

for _op in CPU_EXTENSION_OPS:
    register(_op, "cpu", getattr(torch.ops.bild_kernels_cpu, _op))
