"""Metric functions against hand-computed values (computations written out in comments)."""

import math

import numpy as np
import pytest

from ltp_compress.tasks.metrics import (
    accuracy,
    compute_metrics,
    f1,
    matthews_corrcoef,
    pearson,
    rankdata,
    spearman,
)
from ltp_compress.tasks.glue import TASK_NAMES, get_task

# Binary case A
#   y = 1 1 1 0 0 0 1 0
#   p = 1 0 1 0 1 0 1 0
#   TP = positions 0,2,6 = 3; FN = position 1 = 1; FP = position 4 = 1; TN = 3,5,7 = 3
#   accuracy = (TP+TN)/8 = 6/8 = 0.75
#   F1 = 2TP / (2TP+FP+FN) = 6 / 8 = 0.75
#   MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (9 - 1) / sqrt(4*4*4*4) = 8/16 = 0.5
YA = [1, 1, 1, 0, 0, 0, 1, 0]
PA = [1, 0, 1, 0, 1, 0, 1, 0]

# Binary case B
#   y = 1 0 0 0 1
#   p = 1 1 0 0 0
#   TP = 1 (pos 0), FP = 1 (pos 1), TN = 2 (pos 2,3), FN = 1 (pos 4)
#   accuracy = 3/5 = 0.6
#   F1 = 2 / (2 + 1 + 1) = 0.5
#   MCC = (1*2 - 1*1) / sqrt((1+1)(1+1)(2+1)(2+1)) = 1 / sqrt(36) = 1/6
YB = [1, 0, 0, 0, 1]
PB = [1, 1, 0, 0, 0]


def test_accuracy_f1_mcc_binary():
    assert accuracy(PA, YA) == pytest.approx(0.75)
    assert f1(PA, YA) == pytest.approx(0.75)
    assert matthews_corrcoef(PA, YA) == pytest.approx(0.5)
    assert accuracy(PB, YB) == pytest.approx(0.6)
    assert f1(PB, YB) == pytest.approx(0.5)
    assert matthews_corrcoef(PB, YB) == pytest.approx(1 / 6)


def test_mcc_multiclass():
    # y = 0 1 2 0 1 2 ; p = 0 2 1 0 1 2
    # confusion (rows=true, cols=pred): [[2,0,0],[0,1,1],[0,1,1]]
    # t = row sums = (2,2,2), p = col sums = (2,2,2), c = trace = 4, s = 6
    # MCC = (c*s - sum p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2))
    #     = (24 - 12) / sqrt((36 - 12)(36 - 12)) = 12 / 24 = 0.5
    assert matthews_corrcoef([0, 2, 1, 0, 1, 2], [0, 1, 2, 0, 1, 2]) == pytest.approx(0.5)


def test_degenerate_cases():
    # all predictions one class -> MCC denominator 0 -> 0.0 (sklearn convention)
    assert matthews_corrcoef([1, 1, 1, 1], [0, 1, 0, 1]) == 0.0
    # no positive predicted and none true -> F1 0/0 -> 0.0
    assert f1([0, 0], [0, 0]) == 0.0
    # constant input -> Pearson undefined -> 0.0
    assert pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) == 0.0
    assert matthews_corrcoef(YA, YA) == pytest.approx(1.0)
    assert matthews_corrcoef([1 - y for y in YA], YA) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        accuracy([1, 0], [1])
    with pytest.raises(ValueError):
        accuracy([], [])


def test_pearson_hand():
    # x = 1 2 3 4 (mean 2.5) ; y = 2 4 5 9 (mean 5)
    # dx = -1.5 -0.5 0.5 1.5 ; dy = -3 -1 0 4
    # sum dx*dy = 4.5 + 0.5 + 0 + 6 = 11 ; sum dx^2 = 5 ; sum dy^2 = 26
    # r = 11 / sqrt(5 * 26) = 11 / sqrt(130) = 0.964763...
    assert pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(130))
    assert pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(0.9647638, abs=1e-6)


def test_spearman_with_ties_hand():
    # x = 1 2 2 3 -> average ranks 1 2.5 2.5 4 ; y = 10 20 30 40 -> ranks 1 2 3 4
    # both rank means 2.5 ; drx = -1.5 0 0 1.5 ; dry = -1.5 -0.5 0.5 1.5
    # sum drx*dry = 2.25 + 0 + 0 + 2.25 = 4.5 ; sum drx^2 = 4.5 ; sum dry^2 = 5
    # rho = 4.5 / sqrt(4.5 * 5) = 4.5 / sqrt(22.5) = sqrt(0.9) = 0.948683...
    np.testing.assert_allclose(rankdata([1, 2, 2, 3]), [1, 2.5, 2.5, 4])
    np.testing.assert_allclose(rankdata([3, 1, 3, 3]), [3, 1, 3, 3])  # three tied at ranks 2,3,4
    assert spearman([1, 2, 2, 3], [10, 20, 30, 40]) == pytest.approx(math.sqrt(0.9))
    # monotone but non-linear -> rank correlation exactly +-1
    assert spearman([1, 2, 3, 4], [1, 4, 9, 100]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [100, 9, 4, 1]) == pytest.approx(-1.0)


def test_compute_metrics_per_task():
    mrpc = compute_metrics(get_task("mrpc"), PA, YA)
    # f1_acc = (0.75 + 0.75) / 2
    assert mrpc == pytest.approx({"accuracy": 0.75, "f1": 0.75, "f1_acc": 0.75, "main": 0.75})
    qqp = compute_metrics(get_task("qqp"), PB, YB)
    # (0.5 + 0.6) / 2 = 0.55
    assert qqp["f1_acc"] == pytest.approx(0.55) and qqp["main"] == pytest.approx(0.55)
    cola = compute_metrics(get_task("cola"), PB, YB)
    assert cola == pytest.approx({"mcc": 1 / 6, "main": 1 / 6})
    sst2 = compute_metrics(get_task("sst2"), PA, YA)
    assert sst2 == pytest.approx({"accuracy": 0.75, "main": 0.75})
    # logits are argmax-ed
    logits = np.eye(2)[PA] * 3.0 - 1.0
    assert compute_metrics(get_task("sst2"), logits, YA)["accuracy"] == pytest.approx(0.75)
    stsb = compute_metrics(get_task("stsb"), [1, 2, 2, 3], [10, 20, 30, 40])
    # pearson: x = 1 2 2 3 (mean 2), y = 10 20 30 40 (mean 25): dx = -1 0 0 1, dy = -15 -5 5 15
    # sum dxdy = 30, sum dx^2 = 2, sum dy^2 = 500 -> r = 30 / sqrt(1000) = 0.948683 (= sqrt(0.9))
    assert stsb["pearson"] == pytest.approx(math.sqrt(0.9))
    assert stsb["spearman"] == pytest.approx(math.sqrt(0.9))
    assert stsb["main"] == pytest.approx(math.sqrt(0.9))
    mnli = compute_metrics(get_task("mnli"), [0, 1, 2, 2], [0, 1, 2, 1])
    assert mnli["main"] == pytest.approx(0.75)


def test_every_task_main_metric_is_computable():
    for name in TASK_NAMES:
        task = get_task(name)
        assert task.main_metric in task.metrics
        if task.num_labels == 1:
            out = compute_metrics(task, [0.1, 0.5, 0.9], [0.0, 1.0, 2.0])
        else:
            out = compute_metrics(task, [0, 1, 1, 0], [0, 1, 0, 0])
        assert set(out) == set(task.metrics) | {"main"}
        assert all(isinstance(v, float) for v in out.values())
