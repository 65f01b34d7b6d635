"""recall@k and NDCG@k against a brute-force numpy reference (ties, masking, no-relevant users)."""

import numpy as np
import pytest

from nnlib.recsys import ndcg_at_k, ranking_metrics, recall_at_k, top_k_items


def reference(scores, relevant, seen, k):
    """Per-user recall@k and NDCG@k by explicit loops: stable sort (ties to the
    lower item id), drop seen items, take k, binary relevance."""
    recall, ndcg = [], []
    for s, rel, sn in zip(scores, relevant, seen, strict=True):
        ranked = [j for j in np.argsort(-s, kind="stable") if not sn[j]][:k]
        n_rel = int(rel.sum())
        if n_rel == 0:
            recall.append(np.nan)
            ndcg.append(np.nan)
            continue
        hits = [float(rel[j]) for j in ranked]
        recall.append(sum(hits) / n_rel)
        dcg = sum(h / np.log2(r + 2) for r, h in enumerate(hits))
        idcg = sum(1 / np.log2(r + 2) for r in range(min(k, n_rel)))
        ndcg.append(dcg / idcg)
    return np.array(recall), np.array(ndcg)


def random_case(seed, users=12, items=30, integer_scores=False):
    rng = np.random.default_rng(seed)
    if integer_scores:  # many ties
        scores = rng.integers(0, 4, (users, items)).astype(np.float32)
    else:
        scores = rng.standard_normal((users, items)).astype(np.float32)
    seen = rng.random((users, items)) < 0.3
    relevant = (rng.random((users, items)) < 0.15) & ~seen
    relevant[0] = False  # a user with nothing held out
    relevant[1] = ~seen[1]  # every unseen item relevant
    return scores, relevant, seen


@pytest.mark.parametrize("integer_scores", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("k", [1, 5, 17])
def test_recall_and_ndcg_match_bruteforce(k, integer_scores):
    scores, relevant, seen = random_case(k, integer_scores=integer_scores)
    want_recall, want_ndcg = reference(scores, relevant, seen, k)
    got_recall = np.asarray(recall_at_k(scores, relevant, seen, k=k))
    got_ndcg = np.asarray(ndcg_at_k(scores, relevant, seen, k=k))
    np.testing.assert_allclose(got_recall, want_recall, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got_ndcg, want_ndcg, rtol=1e-6, atol=1e-7)
    assert np.isnan(got_recall[0]) and np.isnan(got_ndcg[0])
    # a user whose every unseen item is relevant gets a perfect list
    if k <= (~seen[1]).sum():
        assert got_ndcg[1] == pytest.approx(1.0)


def test_masking_seen_items_changes_the_list():
    # item 0 scores highest but was seen in training: without the mask it
    # takes the only slot of a top-1 list and the held-out item 1 is missed
    scores = np.array([[3.0, 2.0, 1.0]], np.float32)
    relevant = np.array([[False, True, False]])
    seen = np.array([[True, False, False]])
    assert float(recall_at_k(scores, relevant, seen, k=1)[0]) == 1.0
    assert float(recall_at_k(scores, relevant, None, k=1)[0]) == 0.0
    np.testing.assert_array_equal(top_k_items(scores, 2, seen), [[1, 2]])


def test_ties_go_to_the_lower_item_id():
    scores = np.zeros((1, 6), np.float32)
    np.testing.assert_array_equal(top_k_items(scores, 3), [[0, 1, 2]])
    seen = np.array([[False, True, False, True, False, False]])
    np.testing.assert_array_equal(top_k_items(scores, 3, seen), [[0, 2, 4]])


def test_ndcg_closed_form_positions():
    # one relevant item at rank r (1-based) has NDCG 1/log2(r + 1)
    scores = np.arange(10, 0, -1, dtype=np.float32)[None].repeat(10, 0)  # item j at rank j + 1
    relevant = np.eye(10, dtype=bool)
    got = np.asarray(ndcg_at_k(scores, relevant, k=10))
    np.testing.assert_allclose(got, 1 / np.log2(np.arange(2, 12)), rtol=1e-6)


@pytest.mark.parametrize("integer_scores", [False, True], ids=["distinct", "ties"])
def test_ranking_metrics_averages_users_with_relevant_items(integer_scores):
    # one top-max(k) list serves every k: same values as the per-k reference
    scores, relevant, seen = random_case(3, integer_scores=integer_scores)
    got = ranking_metrics(scores, relevant, seen, recall_ks=(1, 5, 13), ndcg_ks=(2, 13))
    assert sorted(got) == ["ndcg@13", "ndcg@2", "recall@1", "recall@13", "recall@5"]
    for k in (1, 2, 5, 13):
        want_recall, want_ndcg = reference(scores, relevant, seen, k)
        if f"recall@{k}" in got:
            assert got[f"recall@{k}"] == pytest.approx(np.nanmean(want_recall), rel=1e-6)
        if f"ndcg@{k}" in got:
            assert got[f"ndcg@{k}"] == pytest.approx(np.nanmean(want_ndcg), rel=1e-6)


def test_bad_shapes_fail_with_names():
    scores = np.zeros((2, 5), np.float32)
    with pytest.raises(ValueError, match=r"recall_at_k expected relevant .* \(2, 5\), got \(2, 4\)"):
        recall_at_k(scores, np.zeros((2, 4), bool), k=2)
    with pytest.raises(ValueError, match="ndcg_at_k expected 1 <= k <= items = 5, got k=6"):
        ndcg_at_k(scores, np.zeros((2, 5), bool), k=6)
