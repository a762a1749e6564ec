"""Local re-ranking of candidate studies for query texts."""
import pytest
import torch

from clinvla_engine.losses import local_alignment_scores_ref
from clinvla_engine.rerank import rerank


def case(q=2, k=9, m=11, t=6, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = torch.randn(q, t, d, generator=g)
    wmask = torch.rand(q, t, generator=g) < 0.8
    wmask[:, 0] = True
    regions = torch.randn(k, m, d, generator=g)
    rmask = torch.rand(k, m, generator=g) < 0.9
    rmask[:, 0] = True
    return words, wmask, regions, rmask


@pytest.mark.parametrize("fused", [False, True])
def test_rerank_orders_candidates_by_local_score(fused):
    pytest.importorskip("triton")
    words, wmask, regions, rmask = case()
    scores, idx = rerank(words, wmask, regions, rmask, top_k=4, fused=fused, chunk=4)
    full = local_alignment_scores_ref(regions, words, wmask, rmask).t()  # (Q, K)
    expected = full.sort(dim=1, descending=True, stable=True)
    assert idx.tolist() == expected.indices[:, :4].tolist()
    torch.testing.assert_close(scores, expected.values[:, :4], atol=1e-4, rtol=1e-5)


def test_rerank_edge_cases():
    words, wmask, regions, rmask = case(q=1, k=3)
    s, i = rerank(words, wmask, regions, rmask, top_k=10)
    assert s.shape == (1, 3) and sorted(i[0].tolist()) == [0, 1, 2]
    # identical candidates tie: the smaller index comes first
    dup = regions[:1].expand(4, -1, -1).contiguous()
    _, i = rerank(words, wmask, dup, None, top_k=4)
    assert i[0].tolist() == [0, 1, 2, 3]
    s, i = rerank(words, wmask, regions[:0], rmask[:0], top_k=5)
    assert s.shape == (1, 0) and i.shape == (1, 0)
    with pytest.raises(ValueError, match=r"text_words must be \(Q, T, D\)"):
        rerank(words[0], wmask[0], regions, rmask, top_k=2)
    with pytest.raises(ValueError, match="top_k must be at least 1"):
        rerank(words, wmask, regions, rmask, top_k=0)
