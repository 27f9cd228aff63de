import numpy as np
import pytest

from engine.metrics import classification_metrics, expected_calibration_error


def test_hand_computed_binary_case():
    # true:  0 0 0 1 1 ; predicted: 0 1 0 1 0
    logits = np.log(np.array([[0.9, 0.1], [0.4, 0.6], [0.7, 0.3], [0.2, 0.8], [0.55, 0.45]]))
    labels = np.array([0, 0, 0, 1, 1])
    m = classification_metrics(logits, labels, ["neg", "pos"])
    assert m["n"] == 5
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["confusion"] == [[2, 1], [1, 1]]
    # neg: P 2/3 R 2/3 F1 2/3; pos: P 1/2 R 1/2 F1 1/2
    assert m["per_class"]["neg"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["pos"]["recall"] == pytest.approx(1 / 2)
    assert m["f1"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    nll = -np.log([0.9, 0.4, 0.7, 0.8, 0.45]).mean()
    assert m["loss"] == pytest.approx(nll)


def test_ece_by_hand():
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.35, 0.65], [0.35, 0.65]])
    labels = np.array([0, 1, 1, 1])
    # bin (0.9,1.0]: conf .95, acc .5 -> .45 ; bin (0.6,0.7]: conf .65, acc 1 -> .35; equal weights
    assert expected_calibration_error(probs, labels) == pytest.approx(0.5 * 0.45 + 0.5 * 0.35)


def test_perfectly_calibrated_is_zero():
    probs = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(probs, np.array([0, 1])) == pytest.approx(0.0)


def test_macro_f1_averages_every_class_the_model_can_predict():
    # a 3-class model on 2-class data, once predicting the absent class c:
    # a: P=1, R=1/2, F1=2/3; b: P=1, R=1, F1=1; c: P=0 (0 of 1), R=0/0 -> 0, F1=0
    logits = np.eye(3)[[0, 2, 1, 1]] * 5
    m = classification_metrics(logits, np.array([0, 0, 1, 1]), ["a", "b", "c"])
    assert m["f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert m["f1"] < m["accuracy"] == 0.75  # the old average over a and b only gave 5/6
    assert m["per_class"]["c"]["support"] == 0


def test_standard_error_of_an_accuracy():
    from engine.metrics import standard_error
    assert standard_error(0.9, 100) == pytest.approx(0.03)  # sqrt(0.9 * 0.1 / 100)
    assert standard_error(0.5, 25_000) == pytest.approx(0.5 / np.sqrt(25_000))
    assert standard_error(1.0, 10) == 0.0 and standard_error(0.5, 0) == 0.0
    # what metrics.json reports beside each accuracy: 3 of 5 right
    m = classification_metrics(np.eye(2)[[0, 1, 0, 1, 1]], np.array([0, 0, 0, 1, 0]), ["neg", "pos"])
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["accuracy_se"] == pytest.approx(np.sqrt(0.6 * 0.4 / 5))


def test_a_confidence_on_a_bin_edge_falls_in_the_bin_below():
    # bins are (lo, hi]: 0.5 is in (0.4, 0.5] alone (right, 0.5 off), 0.55 in (0.5, 0.6] (wrong, 0.55 off)
    probs = np.array([[0.5, 0.5], [0.55, 0.45]])
    assert expected_calibration_error(probs, np.array([0, 1])) == pytest.approx(0.5 * 0.5 + 0.5 * 0.55)


def test_huge_logits_give_finite_probabilities_and_loss():
    m = classification_metrics(np.array([[1000.0, 0.0], [0.0, 1000.0]]), np.array([0, 0]), ["neg", "pos"])
    # the wrong one is sure and wrong: its probability is clipped at 1e-12
    assert m["accuracy"] == 0.5 and m["loss"] == pytest.approx(-np.log(1e-12) / 2)
    assert m["ece"] == pytest.approx(0.5)


def test_throughput_counts_the_padding_share():
    from engine.metrics import Throughput
    t = Throughput()
    t.add(samples=2, real_tokens=6, padded_tokens=8)
    t.add(samples=2, real_tokens=6, padded_tokens=8)
    assert t.summary()["padding_share"] == pytest.approx(0.25) and t.summary()["samples"] == 4


def test_confusion_rows_are_true_classes_columns_predictions():
    # true 0 1 1 1, predicted 0 0 0 1: neg is over-predicted (precision 1/3, recall 1), pos the reverse
    m = classification_metrics(np.eye(2)[[0, 0, 0, 1]] * 3, np.array([0, 1, 1, 1]), ["neg", "pos"])
    assert m["confusion"] == [[1, 0], [2, 1]]
    neg, pos = m["per_class"]["neg"], m["per_class"]["pos"]
    assert (neg["precision"], neg["recall"], pos["precision"]) == (pytest.approx(1 / 3), 1.0, 1.0)
    assert pos["recall"] == pytest.approx(1 / 3) and (neg["support"], pos["support"]) == (1, 3)


def test_a_resumed_run_states_the_steps_it_timed_and_has_no_rates_without_any():
    from engine.metrics import timed_steps

    summary = {"steps": 48, "steps_per_epoch": 24, "train_seconds": 3.8, "samples": 304, "samples_per_s": 80.0,
               "real_tokens_per_s": 900.0, "padded_tokens_per_s": 1000.0, "padding_share": 0.1, "skipped_steps": 0}
    resumed = timed_steps(summary, 10)  # resumed at step 10: this process timed 38 steps
    assert (resumed["resumed_at_step"], resumed["steps_timed"], resumed["samples_per_s"]) == (10, 38, 80.0)
    assert timed_steps(summary, 0)["steps_timed"] == 48
    # resumed from the run's last checkpoint: nothing timed, so no rate rather than 0 samples/s
    last = timed_steps({**summary, "samples": 0, "samples_per_s": 0.0, "train_seconds": 0.0}, 48)
    assert last["steps_timed"] == 0
    assert [last[k] for k in ("samples_per_s", "real_tokens_per_s", "padded_tokens_per_s", "padding_share")] == \
        [None] * 4
