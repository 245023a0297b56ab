import math

import torch

from tools.unigram_baseline import unigram_ppl


def test_unigram_ppl_matches_hand_computation():
    train = torch.tensor([0, 0, 1, 2])  # counts + 1 over vocab 4: [3, 2, 2, 1] / 8
    val = torch.tensor([0, 3])
    expected = math.exp(-(math.log(3 / 8) + math.log(1 / 8)) / 2)
    assert math.isclose(unigram_ppl(train, val, 4), expected, rel_tol=1e-12)
