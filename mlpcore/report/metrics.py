"""Accuracy, confusion matrices and classification reports, in plain numpy.

scikit-learn's ``classification_report`` gives the same numbers (a test checks
it); this module exists so that the report does not pay scikit-learn's import
time inside a timed run.
"""

from __future__ import annotations

import numpy as np


def accuracy(y_true, y_pred):
    """Fraction of correct predictions."""
    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))


def confusion_matrix(y_true, y_pred, n_classes=10):
    """``C[i, j]`` = number of samples of class ``i`` predicted as ``j``."""
    return np.bincount(np.asarray(y_true, dtype=np.intp) * n_classes + np.asarray(y_pred, dtype=np.intp),
                       minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def per_class_scores(y_true, y_pred, n_classes=10):
    """Precision, recall, F1 and support of each class (0 where undefined, as scikit-learn)."""
    cm = confusion_matrix(y_true, y_pred, n_classes)
    tp = np.diag(cm).astype(float)
    predicted, support = cm.sum(axis=0), cm.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return precision, recall, f1, support


def classification_report(y_true, y_pred, n_classes=10, digits=4):
    """Text table in the layout of scikit-learn's ``classification_report``."""
    precision, recall, f1, support = per_class_scores(y_true, y_pred, n_classes)
    total = support.sum()
    lines = [f"{'':>12} {'precision':>9} {'recall':>9} {'f1-score':>9} {'support':>9}", ""]
    for c in range(n_classes):
        lines.append(f"{c:>12} {precision[c]:>9.{digits}f} {recall[c]:>9.{digits}f} "
                     f"{f1[c]:>9.{digits}f} {support[c]:>9}")
    lines.append("")
    lines.append(f"{'accuracy':>12} {'':>9} {'':>9} {accuracy(y_true, y_pred):>9.{digits}f} {total:>9}")
    lines.append(f"{'macro avg':>12} {precision.mean():>9.{digits}f} {recall.mean():>9.{digits}f} "
                 f"{f1.mean():>9.{digits}f} {total:>9}")
    w = support / total
    lines.append(f"{'weighted avg':>12} {(precision * w).sum():>9.{digits}f} {(recall * w).sum():>9.{digits}f} "
                 f"{(f1 * w).sum():>9.{digits}f} {total:>9}")
    return "\n".join(lines)


def speedup(t_sequential, t_parallel):
    """``T_seq / T_par``: how many times faster the parallel run was."""
    return t_sequential / t_parallel if t_parallel > 0 else float("nan")


def efficiency(t_sequential, t_parallel, workers):
    """Speed-up per worker; 1.0 is perfect linear scaling."""
    return speedup(t_sequential, t_parallel) / workers
