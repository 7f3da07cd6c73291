"""copy_blocks: the transfer backends' copy between two paged caches of different sizes."""
from __future__ import annotations

import pytest
import torch

from turbine.transfer.block_copy import copy_blocks


def test_copies_the_named_blocks_and_nothing_else() -> None:
    src = torch.randn(3, 2, 10, 4, 2, 8)
    dst = torch.zeros(3, 2, 7, 4, 2, 8)
    copy_blocks(dst, [6, 0, 3], src, [2, 9, 5])
    assert torch.equal(dst[:, :, [6, 0, 3]], src[:, :, [2, 9, 5]])
    assert dst[:, :, [1, 2, 4, 5]].abs().sum() == 0


def test_refuses_another_layout() -> None:
    with pytest.raises(ValueError, match="layouts differ"):
        copy_blocks(torch.zeros(3, 2, 7, 4, 2, 8), [0], torch.zeros(3, 2, 7, 4, 2, 4), [0])
    with pytest.raises(ValueError, match="one destination block per source block"):
        copy_blocks(torch.zeros(3, 2, 7, 4, 2, 8), [0, 1], torch.zeros(3, 2, 7, 4, 2, 8), [0])
