"""Task similarity (PARC, RSA, linear CKA) on hand-computed cases, and the source weights' limits."""
from __future__ import annotations

import math

import numpy as np
import pytest

from distill.similarity import (SIMILARITIES, cka, lower_triangle, one_hot, parc, pca_reduce, pearson_distances, rsa,
                                similarity_weights)

# three examples, labels [0, 0, 1]: label distances (1,0)=0, (2,0)=2, (2,1)=2 in lower-triangle order
X3 = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [1.0, 2.0, 4.0]])
Y3 = np.array([0, 0, 1])


def test_pearson_distances_and_lower_triangle_by_hand():
    d = pearson_distances(X3)
    # rows 0 and 1 are reversed (corr -1); corr(row 0, row 2) = 3 / (sqrt(2) sqrt(42) / 3) = 9 / sqrt(84)
    np.testing.assert_allclose(lower_triangle(d), [2.0, 1 - 9 / math.sqrt(84), 1 + 9 / math.sqrt(84)])
    np.testing.assert_allclose(lower_triangle(pearson_distances(one_hot(Y3))), [0.0, 2.0, 2.0])
    assert np.allclose(np.diag(d), 0.0)


def test_rsa_by_hand():
    # feature distances [2, 0.018, 1.982] rank [3, 1, 2]; label distances [0, 2, 2] rank [1, 2.5, 2.5]:
    # Pearson of the ranks = -1.5 / (sqrt(2) sqrt(1.5)) = -sqrt(3) / 2
    assert rsa(X3, Y3) == pytest.approx(-math.sqrt(3) / 2)


def test_parc_by_hand_standardises_before_the_distances():
    # standardised columns [-.71, 1.41, -.71], [0, 0, 0], [.27, -1.34, 1.07] give feature distances
    # about [1.972, 0.069, 1.991], ranks [2, 1, 3]; against label ranks [1, 2.5, 2.5] Spearman is 0
    assert parc(X3, Y3) == pytest.approx(0.0, abs=1e-12)


def test_parc_is_one_when_the_features_are_the_labels():
    y = np.array([0, 1, 2, 0, 1, 2])
    assert parc(one_hot(y) * 5 + 1, y) == pytest.approx(1.0)
    unbalanced = np.array([0, 1, 2, 0, 1, 2, 2])
    assert rsa(one_hot(unbalanced), unbalanced) == pytest.approx(1.0)
    # standardising columns of unequal class sizes reweights them: PARC sees the same order, not the same values
    assert 0.5 < parc(one_hot(unbalanced), unbalanced) < 1.0


def test_parc_reduces_to_32_principal_components():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 10)
    low = rng.normal(size=(40, 8))
    padded = np.concatenate([low, np.zeros((40, 100))], axis=1)
    wide, other = (padded @ np.linalg.qr(rng.normal(size=(108, 108)))[0] for _ in range(2))
    # two rotations of the same 8-dim point cloud: PCA recovers the same coordinates, so PARC matches
    assert parc(wide, y, dim=8) == pytest.approx(parc(other, y, dim=8))
    z = pca_reduce(wide, 32)
    assert z.shape == (40, 32)
    # distances between points survive the reduction (the cloud has rank 8 <= 32)
    a = ((wide[:, None] - wide[None]) ** 2).sum(-1)
    b = ((z[:, None] - z[None]) ** 2).sum(-1)
    np.testing.assert_allclose(a, b, atol=1e-8)


def test_linear_cka_by_hand():
    # Xc = [-1.5, -.5, .5, 1.5]; Y^T Xc = [-2, 2]: ||.||^2 = 8; ||Xc^T Xc|| = 5; ||Yc^T Yc||_F = 2 -> 0.8
    assert cka(np.array([[1.0], [2.0], [3.0], [4.0]]), np.array([0, 0, 1, 1])) == pytest.approx(0.8)
    y = np.array([0, 1, 2, 0, 1, 2])
    assert cka(one_hot(y), y) == pytest.approx(1.0)


def test_the_label_carrying_representation_ranks_first_for_every_metric():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(5), 8)
    signal = one_hot(y) @ rng.normal(size=(5, 64)) + 0.5 * rng.normal(size=(40, 64))
    for name in SIMILARITIES:
        fn = SIMILARITIES.get(name)
        noise = [fn(rng.normal(size=(40, 64)), y) for _ in range(3)]
        assert fn(signal, y) > max(noise) + 0.05, name


def test_bad_inputs_and_names_raise():
    with pytest.raises(ValueError, match="2 classes"):
        parc(np.ones((4, 3)), np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match="do not match"):
        cka(np.ones((4, 3)), np.zeros(5, dtype=int))
    with pytest.raises(KeyError, match="cka, parc, rsa"):
        SIMILARITIES.get("prc")


def test_constant_features_have_no_similarity():
    assert parc(np.ones((6, 3)), np.array([0, 1, 0, 1, 0, 1])) == 0.0
    assert cka(np.ones((6, 3)), np.array([0, 1, 0, 1, 0, 1])) == 0.0


# ------------------------------------------------------------------ weights (Borup et al. eq. 5)

S = [0.1, 0.5, 0.3]


def test_weight_temperature_zero_gives_equal_weights():
    np.testing.assert_array_equal(similarity_weights(S, 0.0), [1 / 3, 1 / 3, 1 / 3])


def test_large_weight_temperature_gives_the_nearest_source():
    np.testing.assert_array_equal(similarity_weights(S, math.inf), [0.0, 1.0, 0.0])
    np.testing.assert_allclose(similarity_weights(S, 1e4), [0.0, 1.0, 0.0], atol=1e-12)
    assert similarity_weights([0.2, 0.7, 0.7], math.inf).tolist() == [0.0, 0.5, 0.5]


def test_weights_are_the_softmax_of_p_times_similarity():
    e = np.exp(2.0 * np.array(S))
    np.testing.assert_allclose(similarity_weights(S, 2.0), e / e.sum())
    w = [similarity_weights(S, p) for p in (0.0, 1.0, 4.0, 16.0, 64.0)]
    assert all(a[1] < b[1] for a, b in zip(w, w[1:]))   # sharper towards the nearest as p grows
    with pytest.raises(ValueError, match=">= 0"):
        similarity_weights(S, -1.0)
