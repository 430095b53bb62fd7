"""The 3-way state labels of the base model and their packing: 5 labels per byte (base 3), or 4 (2-bit).

Every element of a hidden state is labelled ``NEG`` (h <= neg), ``POS`` (h >= pos) or ``INACTIVE``
(the codes of :mod:`gere_plugin.ops.losses`). Labels are stored 5 per byte in base 3 (1.6 bits each:
1/20 of the fp32 activations; plain 2-bit packing would be exactly 1/16).
"""

from __future__ import annotations

import torch

from ..ops.losses import INACTIVE, NEG, POS

# 2-bit packing (pure functions)
_SHIFTS = (0, 2, 4, 6)


def pack_2bit(codes: torch.Tensor) -> torch.Tensor:
    """Pack integer codes in ``[0, 3]`` along the last dim, 4 per byte: ``[..., H] -> [..., ceil(H/4)]``."""
    h = codes.shape[-1]
    pad = (-h) % 4
    c = codes.to(torch.uint8)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad), value=0)
    c = c.reshape(*c.shape[:-1], c.shape[-1] // 4, 4)
    return c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)


def unpack_2bit(packed: torch.Tensor, hidden: int) -> torch.Tensor:
    """Inverse of :func:`pack_2bit`: ``[..., ceil(H/4)] -> [..., H]`` uint8 codes (one vectorised op)."""
    shifts = torch.tensor(_SHIFTS, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & 3
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * 4)[..., :hidden]


# Base-3 packing: 3**5 = 243 <= 256, so 5 three-way labels fit in one byte (1.6 bits per label,
# 1/20 of fp32). Unpacking is a single gather from a 256 x 5 lookup table.
TRITS_PER_BYTE = 5
_POW3 = (1, 3, 9, 27, 81)
_TRIT_TABLE = torch.tensor([[(b // p) % 3 for p in _POW3] for b in range(256)], dtype=torch.uint8)
_TABLES: dict[torch.device, torch.Tensor] = {}


def packed_width(hidden: int) -> int:
    """Bytes per (token, layer) row of packed labels."""
    return (hidden + TRITS_PER_BYTE - 1) // TRITS_PER_BYTE


def pack_trits(codes: torch.Tensor) -> torch.Tensor:
    """Pack codes in ``[0, 2]`` along the last dim, 5 per byte (base 3): ``[..., H] -> [..., ceil(H/5)]``."""
    h = codes.shape[-1]
    pad = (-h) % TRITS_PER_BYTE
    c = codes.to(torch.int16)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad), value=0)
    c = c.reshape(*c.shape[:-1], c.shape[-1] // TRITS_PER_BYTE, TRITS_PER_BYTE)
    weights = torch.tensor(_POW3, dtype=torch.int16, device=c.device)
    return (c * weights).sum(-1).to(torch.uint8)


def unpack_trits(packed: torch.Tensor, hidden: int) -> torch.Tensor:
    """Inverse of :func:`pack_trits` (one table gather): ``[..., ceil(H/5)] -> [..., H]`` uint8 codes."""
    table = _TABLES.get(packed.device)
    if table is None:
        table = _TABLES[packed.device] = _TRIT_TABLE.to(packed.device)
    # index_select with an int32 index: several times faster on CPU than advanced indexing with int64.
    codes = table.index_select(0, packed.reshape(-1).int())
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * TRITS_PER_BYTE)[..., :hidden]


def label_states(h: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """State codes of activations ``h`` (``[..., H]``): NEG if h <= neg, POS if h >= pos, else INACTIVE."""
    code = torch.full(h.shape, INACTIVE, dtype=torch.uint8, device=h.device)
    code[h >= pos] = POS
    code[h <= neg] = NEG
    return code
