"""Batch padding: the one place token-id lists become ``(input_ids, attention_mask)`` tensors."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token-id lists into ``(ids, mask)`` of width ``max(len)``, padded with ``pad_id``.

    Right padding by default (scoring, replay rows); ``left=True`` for generation, where every row
    must end at the last column. ``mask`` is 1 on real tokens and 0 on padding (both ``long``).
    """
    if not seqs:
        raise ValueError("pad_sequences needs at least one sequence")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        n = len(seq)
        if n == 0:
            continue
        cols = slice(width - n, width) if left else slice(0, n)
        ids[row, cols] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, cols] = 1
    return ids, mask


def stack_right_padded(
    parts: Sequence[tuple[torch.Tensor, torch.Tensor]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack right-padded ``(ids, mask)`` batches of different widths into one batch of the widest width.

    Rows keep their order (the first batch's rows first) and their columns: a right-padded row only gains
    padding at its end, so a causal model gives its real tokens the same positions and outputs as in its
    own batch, and ``out[a:b, :width]`` recovers a part (``width`` its own width).
    """
    if not parts:
        raise ValueError("stack_right_padded needs at least one batch")
    width = max(int(ids.shape[1]) for ids, _ in parts)
    ids_out, mask_out = [], []
    for ids, mask in parts:
        extra = width - int(ids.shape[1])
        ids_out.append(torch.nn.functional.pad(ids, (0, extra), value=int(pad_id)))
        mask_out.append(torch.nn.functional.pad(mask, (0, extra), value=0))
    return torch.cat(ids_out), torch.cat(mask_out)
