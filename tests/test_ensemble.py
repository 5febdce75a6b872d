"""Votes of mlpcore.strategies.ensemble and the numbers of mlpcore.report.metrics against scikit-learn."""

import re

import numpy as np
import pytest
from sklearn import metrics as skm

from mlpcore.report import metrics
from mlpcore.strategies.ensemble import hard_vote, soft_vote


def P(*members):
    """probs of shape (members, samples, classes) from nested lists."""
    return np.array(members, dtype=np.float32)


# -- soft vote -------------------------------------------------------------------------
def test_soft_vote_takes_the_highest_mean_probability():
    probs = P(
        [[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.1, 0.8, 0.1]],
        [[0.1, 0.5, 0.4], [0.3, 0.4, 0.3], [0.5, 0.1, 0.4]],
        [[0.1, 0.5, 0.4], [0.3, 0.4, 0.3], [0.1, 0.2, 0.7]],
    )
    # sums: [0.8, 1.3, 0.9] -> 1; [0.8, 1.0, 1.2] -> 2; [0.7, 1.1, 1.2] -> 2
    np.testing.assert_array_equal(soft_vote(probs), [1, 2, 2])


def test_soft_vote_of_one_member_is_its_argmax():
    probs = np.random.default_rng(0).dirichlet(np.ones(10), size=(1, 50))
    np.testing.assert_array_equal(soft_vote(probs), probs[0].argmax(axis=1))


# -- hard vote -------------------------------------------------------------------------
def test_hard_vote_majority_beats_a_confident_minority():
    # Two members vote 0 without conviction, one votes 2 very confidently.
    probs = P([[0.40, 0.35, 0.25]], [[0.40, 0.30, 0.30]], [[0.00, 0.01, 0.99]])
    assert soft_vote(probs)[0] == 2          # mean probability: [0.27, 0.22, 0.51]
    assert hard_vote(probs)[0] == 0          # but two votes to one


def test_hard_vote_tie_goes_to_the_larger_summed_probability_not_the_lower_label():
    # Member A votes 1, member B votes 2: a 1-1 tie. bincount().argmax() would pick 1,
    # the lower label; summed probability favours 2 (0.9 against 0.55).
    probs = P([[0.10, 0.50, 0.40]], [[0.45, 0.05, 0.50]])
    votes = probs.argmax(axis=2)[:, 0]
    assert np.bincount(votes, minlength=3).argmax() == 1   # the naive rule's answer
    assert hard_vote(probs)[0] == 2


def test_hard_vote_tie_break_only_among_the_tied_classes():
    # Votes 1 and 2 tie; class 0 has the largest summed probability (0.8) but no vote,
    # so the tie goes to 2 (0.75 against 0.45), and soft vote differs (it picks 0).
    probs = P([[0.40, 0.45, 0.15]], [[0.40, 0.00, 0.60]])
    assert soft_vote(probs)[0] == 0
    assert hard_vote(probs)[0] == 2


def test_hard_vote_four_members_two_two_tie():
    probs = P([[0.0, 0.9, 0.1, 0.0]], [[0.0, 0.6, 0.4, 0.0]],
              [[0.0, 0.1, 0.5, 0.4]], [[0.0, 0.05, 0.5, 0.45]])
    # 1 and 2 have two votes each; summed: class 1 1.65, class 2 1.5 -> 1 (the lower label wins on merit)
    assert hard_vote(probs)[0] == 1
    probs[1, 0] = [0.0, 0.55, 0.45, 0.0]
    probs[3, 0] = [0.0, 0.0, 0.9, 0.1]
    # now class 1 sums 1.55, class 2 sums 1.95 -> 2
    assert hard_vote(probs)[0] == 2


def reference_hard_vote(probs):
    """A slow, obvious implementation: most votes, then largest summed probability, then lowest label."""
    out = []
    for s in range(probs.shape[1]):
        votes = np.bincount(probs[:, s].argmax(axis=1), minlength=probs.shape[2])
        summed = probs[:, s].sum(axis=0)
        tied = np.flatnonzero(votes == votes.max())
        out.append(tied[np.argmax(summed[tied])])
    return np.array(out)


@pytest.mark.parametrize("members", [2, 3, 4, 5])
def test_hard_vote_matches_the_obvious_rule_on_random_probabilities(members):
    rng = np.random.default_rng(members)
    probs = rng.dirichlet(np.full(10, 0.3), size=(members, 2000)).astype(np.float32)
    np.testing.assert_array_equal(hard_vote(probs), reference_hard_vote(probs))
    assert soft_vote(probs).shape == hard_vote(probs).shape == (2000,)


# -- metrics against scikit-learn ------------------------------------------------------
@pytest.fixture
def labels():
    """Noisy predictions; class 8 is never predicted (precision undefined -> 0) and 9 never occurs."""
    rng = np.random.default_rng(42)
    y_true = rng.integers(0, 9, 700)
    y_pred = np.where(rng.random(700) < 0.7, y_true, rng.integers(0, 10, 700))
    y_pred[y_pred == 8] = 3
    return y_true, y_pred


def test_accuracy(labels):
    y_true, y_pred = labels
    assert metrics.accuracy(y_true, y_pred) == pytest.approx(skm.accuracy_score(y_true, y_pred), abs=1e-15)


def test_confusion_matrix_equals_scikit_learn(labels):
    y_true, y_pred = labels
    ours = metrics.confusion_matrix(y_true, y_pred)
    np.testing.assert_array_equal(ours, skm.confusion_matrix(y_true, y_pred, labels=list(range(10))))
    assert ours.sum() == len(y_true)


def test_per_class_scores_equal_precision_recall_fscore_support(labels):
    y_true, y_pred = labels
    ours = metrics.per_class_scores(y_true, y_pred)
    theirs = skm.precision_recall_fscore_support(y_true, y_pred, labels=list(range(10)), zero_division=0)
    for name, a, b in zip(("precision", "recall", "f1", "support"), ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=0, err_msg=name)
    assert ours[0][8] == 0 and ours[3][9] == 0  # the undefined cells


ROW = re.compile(r"^\s*(\d|accuracy|macro avg|weighted avg)\s+([\d.\s]+)$")


def parse_report(text):
    rows = {}
    for line in text.splitlines():
        m = ROW.match(line)
        if m:
            rows[m.group(1)] = [float(v) for v in m.group(2).split()]
    return rows


def test_classification_report_numbers_equal_scikit_learn(labels):
    y_true, y_pred = labels
    ours = parse_report(metrics.classification_report(y_true, y_pred, digits=4))
    ref = skm.classification_report(y_true, y_pred, labels=list(range(10)), output_dict=True, zero_division=0)
    assert set(ours) == {*map(str, range(10)), "accuracy", "macro avg", "weighted avg"}
    tol = 0.5e-4 + 1e-12  # printed with 4 digits
    for key in [*map(str, range(10)), "macro avg", "weighted avg"]:
        p, r, f, s = ours[key]
        want = ref[key]
        assert p == pytest.approx(want["precision"], abs=tol), key
        assert r == pytest.approx(want["recall"], abs=tol), key
        assert f == pytest.approx(want["f1-score"], abs=tol), key
        assert s == want["support"], key
    acc, support = ours["accuracy"]
    assert acc == pytest.approx(ref["accuracy"], abs=tol) and support == len(y_true)


def test_classification_report_layout_matches_scikit_learn():
    """Same rows and columns as scikit-learn's text report (numbers aside)."""
    y = np.arange(10).repeat(3)
    ours = metrics.classification_report(y, y, digits=2)
    theirs = skm.classification_report(y, y, digits=2)
    assert [line.split() for line in ours.splitlines()] == [line.split() for line in theirs.splitlines()]


def test_speedup_and_efficiency():
    assert metrics.speedup(10.0, 4.0) == 2.5
    assert metrics.efficiency(10.0, 4.0, 2) == 1.25
    assert np.isnan(metrics.speedup(1.0, 0.0))
