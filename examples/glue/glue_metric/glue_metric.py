"""GLUE metrics as a local ``evaluate`` module: ``evaluate.load("examples/glue/glue_metric", task)``.

The hub's ``glue`` metric needs the network; this module is its offline twin with the
official definitions (Wang et al. 2019, "GLUE: A Multi-Task Benchmark and Analysis
Platform for Natural Language Understanding", ICLR; the same keys as the hub metric):

- cola: Matthews correlation coefficient (``matthews_correlation``);
- stsb: Pearson and Spearman correlations (``pearson``, ``spearmanr``);
- mrpc, qqp: accuracy and binary F1 of the positive class 1 (``accuracy``, ``f1``);
- sst2, mnli, mnli_matched, mnli_mismatched, qnli, rte, wnli, hans: ``accuracy``.

All values are fractions in [0, 1] (correlations in [-1, 1]). The maths is plain numpy,
written from the definitions, so that the test suite can check it against scikit-learn
and scipy as independent oracles.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "GLUE metrics (accuracy, F1, Matthews correlation, Pearson/Spearman), computed offline."

_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted labels (ints), or predicted scores (floats) for stsb.
    references: gold labels (ints), or gold scores (floats) for stsb.
Returns: a dict with the task's keys, e.g. {"accuracy": 0.9, "f1": 0.91} for mrpc.
Examples:
    >>> metric = evaluate.load("examples/glue/glue_metric", "mrpc")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666, 'f1': 0.6666666666666666}
"""

_CITATION = """@inproceedings{wang2019glue,
  title={{GLUE}: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding},
  author={Wang, Alex and Singh, Amanpreet and Michael, Julian and Hill, Felix and Levy, Omer and Bowman, Samuel R.},
  booktitle={International Conference on Learning Representations},
  year={2019}
}"""

ACCURACY_TASKS = ("sst2", "mnli", "mnli_mismatched", "mnli_matched", "qnli", "rte", "wnli", "hans")
CONFIGS = ("cola", "stsb", "mrpc", "qqp", *ACCURACY_TASKS)


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(preds == labels))


def binary_f1(preds: np.ndarray, labels: np.ndarray) -> float:
    """F1 of class 1: 2TP / (2TP + FP + FN); 0.0 when there is no positive at all (as sklearn)."""
    tp = np.sum((preds == 1) & (labels == 1))
    fp = np.sum((preds == 1) & (labels != 1))
    fn = np.sum((preds != 1) & (labels == 1))
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom > 0 else 0.0


def matthews_corr(preds: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation (Gorodkin's multi-class form, binary as a special case); 0.0 if undefined."""
    classes, inv = np.unique(np.concatenate([labels, preds]), return_inverse=True)
    k = len(classes)
    y_true, y_pred = inv[: len(labels)], inv[len(labels):]
    conf = np.zeros((k, k), dtype=np.float64)
    np.add.at(conf, (y_true, y_pred), 1.0)
    t = conf.sum(axis=1)  # true occurrences per class
    p = conf.sum(axis=0)  # predicted occurrences per class
    c = np.trace(conf)
    s = conf.sum()
    cov_tp = c * s - t @ p
    cov_pp = s * s - p @ p
    cov_tt = s * s - t @ t
    if cov_pp * cov_tt == 0:
        return 0.0
    return float(cov_tp / np.sqrt(cov_tt * cov_pp))


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    xc, yc = x - x.mean(), y - y.mean()
    return float((xc @ yc) / np.sqrt((xc @ xc) * (yc @ yc)))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their mean rank (scipy.stats.rankdata's "average")."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # Start index of each run of equal values, and the mean of ranks start+1 .. end.
    new_run = np.r_[True, sorted_x[1:] != sorted_x[:-1]]
    starts = np.flatnonzero(new_run)
    ends = np.r_[starts[1:], len(x)]
    run_rank = (starts + 1 + ends) / 2.0
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(_average_ranks(x), _average_ranks(y))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GlueMetric(evaluate.Metric):
    """The GLUE metric of one task (the task is the ``config_name``)."""

    def _info(self) -> evaluate.MetricInfo:
        if self.config_name not in CONFIGS:
            raise KeyError(
                f"`config_name` must be one of {list(CONFIGS)} (the GLUE task), got {self.config_name!r}."
            )
        dtype = "float32" if self.config_name == "stsb" else "int64"
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value(dtype), "references": datasets.Value(dtype)}),
            reference_urls=["https://gluebenchmark.com/"],
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        preds, labels = np.asarray(predictions), np.asarray(references)
        if self.config_name == "cola":
            return {"matthews_correlation": matthews_corr(preds, labels)}
        if self.config_name == "stsb":
            preds, labels = preds.astype(np.float64), labels.astype(np.float64)
            return {"pearson": pearson(preds, labels), "spearmanr": spearman(preds, labels)}
        if self.config_name in ("mrpc", "qqp"):
            return {"accuracy": accuracy(preds, labels), "f1": binary_f1(preds, labels)}
        return {"accuracy": accuracy(preds, labels)}
