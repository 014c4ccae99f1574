"""Quantized checkpoint formats, converted into `GroupQuantized` at load: GPTQ (v1 and
v2, symmetric or not, any group size, act-order), AWQ "gemm", and GGUF's Q4_0, Q4_1,
Q4_K and Q8_0 blocks. Layouts and sources: ../shared/REFERENCE.md, "Quantized weight
layouts". With fp16 scales every conversion is exact: the dequantized weight equals the
format's own formula bit for bit.

What a checkpoint is, is read from its `config.json` `quantization_config` (or a GGUF's
tensor types), and refused with a message when kubellm does not read it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kubellm.runtime.model.lazy_tensor import LazyTensor
from kubellm.runtime.model.quantized import GroupQuantized, QuantizedLayout

GPTQ_PARTS = ("qweight", "qzeros", "scales")  # and g_idx, which may be absent
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column 8c + AWQ_ORDER[i]


@dataclass(frozen=True)
class HFQuantization:
    """A GPTQ or AWQ checkpoint's `quantization_config`, as far as kubellm reads it."""

    method: str
    group_size: int  # -1: one group per input row (act-order is read from g_idx itself)
    zeros_minus_one: bool = False  # GPTQ v1 stores z - 1

    @classmethod
    def from_config(cls, config: dict[str, Any], where: str) -> HFQuantization:
        method = config.get("quant_method")
        if method not in ("gptq", "awq"):
            raise ValueError(
                f"{where}: quantization_config.quant_method {method!r} is not read "
                f"by kubellm (it reads gptq, awq and GGUF files)"
            )
        bits = config.get("bits", config.get("w_bit"))
        if bits != 4:
            raise ValueError(
                f"{where}: {method} with {bits} bits is not read by kubellm "
                f"(it reads 4-bit {method})"
            )
        group_size = int(config.get("group_size", config.get("q_group_size", 128)))
        if method == "awq":
            version = str(config.get("version", "gemm")).lower()
            if version != "gemm":
                raise ValueError(
                    f"{where}: AWQ version {version!r} is not read by kubellm "
                    f"(it reads the 'gemm' layout)"
                )
            return cls("awq", group_size)
        v1 = config.get("checkpoint_format", "gptq") == "gptq"
        return cls("gptq", group_size, zeros_minus_one=v1)

    def layout(self, in_features: int) -> QuantizedLayout:
        group = in_features if self.group_size == -1 else self.group_size
        return QuantizedLayout(4, group)

    def check_divides(self, sizes: dict[str, int], where: str) -> None:
        for name, size in sizes.items():
            if self.group_size != -1 and size % self.group_size:
                raise ValueError(
                    f"{where}: group_size {self.group_size} does not divide "
                    f"the model's {name} {size}: a malformed checkpoint"
                )


def unpack_int32(
    words: torch.Tensor, dim: int, order: tuple[int, ...] = tuple(range(8))
) -> torch.Tensor:
    """4-bit codes packed eight to an int32 along `dim`: code j of a word at bits 4 * i
    where order[i] == j."""
    nibbles = [(words >> (4 * i)) & 15 for i in range(8)]
    ordered = [nibbles[order.index(j)] for j in range(8)]
    stacked = torch.stack(ordered, dim=dim + 1)
    shape = list(words.shape)
    shape[dim] *= 8
    return stacked.reshape(shape)


def pack_pairs(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] codes 0..15 -> uint8 [N, K/2], even k in the low nibble."""
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def from_gptq(parts: dict[str, torch.Tensor], q: HFQuantization) -> GroupQuantized:
    """W[k, n] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n]."""
    codes = unpack_int32(parts["qweight"], 0).T  # [N, K]
    zeros = unpack_int32(parts["qzeros"], 1).T.float()  # [N, G]
    if q.zeros_minus_one:
        zeros = zeros + 1
    scales = parts["scales"].T.float()
    columns = codes.shape[1]
    group = columns if q.group_size == -1 else q.group_size
    g_idx = parts.get("g_idx")
    perm = None
    if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(columns) // group):
        perm = torch.argsort(g_idx.long(), stable=True)
        if not torch.equal(g_idx.long()[perm], torch.arange(columns) // group):
            raise ValueError(f"g_idx does not put {group} inputs in each group")
        codes = codes[:, perm]
    offsets = -zeros * scales
    return GroupQuantized(pack_pairs(codes), scales, offsets, 4, group, perm)


def from_awq(parts: dict[str, torch.Tensor], q: HFQuantization) -> GroupQuantized:
    """W[k, n] = (q[k, n] - z[k // g, n]) * s[k // g, n], nibbles in AWQ's order."""
    codes = unpack_int32(parts["qweight"], 1, AWQ_ORDER).T
    zeros = unpack_int32(parts["qzeros"], 1, AWQ_ORDER).T.float()
    scales = parts["scales"].T.float()
    group = codes.shape[1] if q.group_size == -1 else q.group_size
    return GroupQuantized(pack_pairs(codes), scales, -zeros * scales, 4, group)


def grouped_hf_tensors(
    tensors: Iterator[tuple[str, LazyTensor]], q: HFQuantization
) -> Iterator[tuple[str, LazyTensor]]:
    """The checkpoint's tensors with each module's qweight, qzeros, scales (and g_idx)
    as one quantized `<module>.weight`; a module missing one of them is refused."""
    parts: dict[str, dict[str, LazyTensor]] = {}
    for name, tensor in tensors:
        module, _, kind = name.rpartition(".")
        if kind in (*GPTQ_PARTS, "g_idx"):
            parts.setdefault(module, {})[kind] = tensor
        else:
            yield name, tensor
    convert = from_gptq if q.method == "gptq" else from_awq
    for module, found in parts.items():
        missing = [kind for kind in GPTQ_PARTS if kind not in found]
        if missing:
            raise ValueError(
                f"{q.method} checkpoint: {module} has {sorted(found)} but no "
                f"{', '.join(missing)} (each quantized layer needs qweight, "
                f"qzeros and scales)"
            )
        whole = {kind: tensor.full() for kind, tensor in found.items()}
        try:
            weight = convert(whole, q)
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"{q.method} checkpoint: {module}: {exc}") from None
        yield f"{module}.weight", LazyTensor.of_quantized(weight)


# GGUF block types kept packed: (block bytes, bits)
GGUF_PACKED = {"Q4_0": (18, 4), "Q4_1": (20, 4), "Q4_K": (144, 4), "Q8_0": (34, 8)}


def from_gguf_blocks(blocks: np.ndarray, kind: str, rows: int) -> GroupQuantized:
    """A GGUF tensor's raw blocks (uint8, `rows` rows) as group-quantized with groups
    of 32 (Q4_K's 256-element super-blocks hold eight 32-element sub-blocks)."""
    block_bytes, bits = GGUF_PACKED[kind]
    b = torch.from_numpy(np.array(blocks, dtype=np.uint8).reshape(-1, block_bytes))  # a copy
    d = b[:, :2].contiguous().view(torch.float16).float()  # [blocks, 1]
    if kind == "Q8_0":
        codes = b[:, 2:].contiguous().view(torch.int8)
        return _gguf_result(codes, d, torch.zeros_like(d), rows, bits)
    if kind == "Q4_K":
        return _from_q4_k(b, d, rows)
    qs = b[:, block_bytes - 16 :]  # Q4_0 and Q4_1: element i low nibble, i + 16 high
    codes = torch.cat((qs & 15, qs >> 4), dim=1)
    if kind == "Q4_0":
        return _gguf_result(codes, d, -8 * d, rows, bits)
    m = b[:, 2:4].contiguous().view(torch.float16).float()
    return _gguf_result(codes, d, m, rows, bits)


def _from_q4_k(b: torch.Tensor, d: torch.Tensor, rows: int) -> GroupQuantized:
    dmin = b[:, 2:4].contiguous().view(torch.float16).float()
    packed = b[:, 4:16].view(-1, 3, 4).long()
    low, high, extra = packed[:, 0], packed[:, 1], packed[:, 2]
    sc = torch.cat((low & 63, (extra & 15) | ((low >> 2) & 48)), dim=1)  # [blocks, 8]
    mins = torch.cat((high & 63, (extra >> 4) | ((high >> 2) & 48)), dim=1)
    qs = b[:, 16:].view(-1, 4, 1, 32)  # 4 chunks of 64: low nibbles first, then high
    codes = torch.cat((qs & 15, qs >> 4), dim=2).reshape(-1, 8, 32)
    scales, offsets = d * sc.float(), -(dmin * mins.float())
    return _gguf_result(
        codes.reshape(-1, 32), scales.reshape(-1, 1), offsets.reshape(-1, 1), rows, 4
    )


def _gguf_result(
    codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, rows: int, bits: int
) -> GroupQuantized:
    """Per-32-element blocks (codes [blocks, 32], scale and offset [blocks, 1]) as rows."""
    codes = codes.reshape(rows, -1)
    if bits == 4:
        codes = pack_pairs(codes)
    return GroupQuantized(codes, scales.reshape(rows, -1), offsets.reshape(rows, -1), bits, 32)
