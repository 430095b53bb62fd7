"""pad_sequences: exact tensors for right and left padding, and the empty-input error."""

from __future__ import annotations

import pytest
import torch

from gere_plugin.padding import pad_sequences


def test_right_padding_exact():
    ids, mask = pad_sequences([[5, 6, 7], [8], []], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long


def test_left_padding_exact():
    ids, mask = pad_sequences([[5, 6, 7], [8, 9]], pad_id=2, left=True)
    assert ids.tolist() == [[5, 6, 7], [2, 8, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 1, 1]]


def test_empty_batch_is_refused():
    with pytest.raises(ValueError, match="at least one"):
        pad_sequences([], pad_id=0)
