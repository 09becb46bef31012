"""The shipped GLUE metric module (examples/glue/glue_metric) against scikit-learn and scipy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

evaluate = pytest.importorskip("evaluate")
metrics = pytest.importorskip("sklearn.metrics")
stats = pytest.importorskip("scipy.stats")

METRIC_PATH = str(Path(__file__).resolve().parents[2] / "examples" / "glue" / "glue_metric")

# (name, predictions, references): fixed inputs, including ties, a constant prediction and
# three classes, where implementations most often differ.
CLASSIFICATION_CASES = [
    ("balanced", [0, 1, 1, 0, 1, 0, 1, 1], [0, 1, 0, 0, 1, 1, 1, 0]),
    ("all_right", [1, 0, 1, 1], [1, 0, 1, 1]),
    ("all_wrong", [1, 0, 0, 1], [0, 1, 1, 0]),
    ("constant_prediction", [1, 1, 1, 1, 1], [0, 1, 0, 1, 1]),
    ("no_positive_predicted", [0, 0, 0, 0], [0, 1, 0, 1]),
    ("no_positive_anywhere", [0, 0, 0], [0, 0, 0]),
    ("random_200", list(np.random.default_rng(0).integers(0, 2, 200)), list(np.random.default_rng(1).integers(0, 2, 200))),
]
THREE_CLASS_CASES = [
    ("mnli_like", [0, 1, 2, 2, 1, 0, 0, 2], [0, 1, 1, 2, 2, 0, 1, 2]),
    ("random_150", list(np.random.default_rng(2).integers(0, 3, 150)), list(np.random.default_rng(3).integers(0, 3, 150))),
]
_rng = np.random.default_rng(4)
_x = _rng.normal(size=60)
REGRESSION_CASES = [
    ("linear_noise", list(_x), list(2 * _x + _rng.normal(scale=0.5, size=60))),
    ("ties", [0.0, 1.0, 1.0, 2.0, 3.0, 3.0, 3.0, 5.0], [0.5, 1.0, 2.0, 2.0, 2.0, 4.0, 4.5, 5.0]),
    ("anti", [1.0, 2.0, 3.0, 4.0], [4.0, 3.5, 1.0, 0.2]),
]


@pytest.fixture(scope="module")
def load():
    cache: dict[str, object] = {}

    def get(task: str):
        if task not in cache:
            cache[task] = evaluate.load(METRIC_PATH, task)
        return cache[task]

    return get


@pytest.mark.parametrize("name,preds,refs", CLASSIFICATION_CASES)
@pytest.mark.parametrize("task", ["mrpc", "qqp"])
def test_accuracy_and_f1_match_sklearn(load, task, name, preds, refs):
    out = load(task).compute(predictions=preds, references=refs)
    assert set(out) == {"accuracy", "f1"}
    assert out["accuracy"] == pytest.approx(metrics.accuracy_score(refs, preds), abs=1e-12)
    assert out["f1"] == pytest.approx(metrics.f1_score(refs, preds, zero_division=0.0), abs=1e-12)


@pytest.mark.parametrize("name,preds,refs", CLASSIFICATION_CASES + THREE_CLASS_CASES)
def test_matthews_matches_sklearn(load, name, preds, refs):
    out = load("cola").compute(predictions=preds, references=refs)
    assert set(out) == {"matthews_correlation"}
    assert out["matthews_correlation"] == pytest.approx(metrics.matthews_corrcoef(refs, preds), abs=1e-12)


@pytest.mark.parametrize("name,preds,refs", THREE_CLASS_CASES + CLASSIFICATION_CASES[:2])
@pytest.mark.parametrize("task", ["sst2", "mnli", "mnli_mismatched", "qnli", "rte", "wnli"])
def test_accuracy_tasks(load, task, name, preds, refs):
    out = load(task).compute(predictions=preds, references=refs)
    assert out == {"accuracy": pytest.approx(metrics.accuracy_score(refs, preds), abs=1e-12)}


@pytest.mark.parametrize("name,preds,refs", REGRESSION_CASES)
def test_stsb_matches_scipy(load, name, preds, refs):
    out = load("stsb").compute(predictions=preds, references=refs)
    assert set(out) == {"pearson", "spearmanr"}
    # the module stores float32 (the hub's feature type), so compare with the same rounding
    p, r = np.float32(preds).astype(np.float64), np.float32(refs).astype(np.float64)
    assert out["pearson"] == pytest.approx(stats.pearsonr(p, r)[0], abs=1e-9)
    assert out["spearmanr"] == pytest.approx(stats.spearmanr(p, r)[0], abs=1e-9)


def test_known_values(load):
    # Hand-computed: TP=2, FP=1, FN=0 -> F1 = 4/5; accuracy 3/4.
    assert load("mrpc").compute(predictions=[1, 1, 1, 0], references=[1, 1, 0, 0]) == {"accuracy": 0.75, "f1": 0.8}
    # MCC of [[1,1],[0,2]] = (1*2 - 1*0) / sqrt(2*2*1*3) = 1/sqrt(3)
    mcc = load("cola").compute(predictions=[0, 1, 1, 1], references=[0, 1, 0, 1])["matthews_correlation"]
    assert mcc == pytest.approx(1 / np.sqrt(3), abs=1e-12)


def test_unknown_task_lists_valid_configs():
    with pytest.raises(KeyError, match=r"must be one of \['cola', 'stsb', 'mrpc'.*got 'squad'"):
        evaluate.load(METRIC_PATH, "squad")
