"""The paper's equations and the loss/metric definitions, against numbers worked out by hand."""

import numpy as np
import pytest

from fedbpt.aggregation import mahalanobis_clip_threshold, paper_sigma, reference_sigma, reference_sigma_sent
from fedbpt.scorer import loss_and_metrics, metric_from_confusion
from fedbpt.search import eq7_fitness

# Four clients, lambda = 5, I = 2 local iterations.
SIGMAS = [np.array([1.0, 0.5]), np.array([0.8, 0.6]), np.array([2.0, 2.0]), np.array([1.0, 1.0])]
FITNESS = np.array([0.3, 0.1, 0.9, 0.5])


def test_eq6_uses_the_best_half_and_divides_by_all_clients_times_lambda():
    # best half by fitness: clients 1 (0.1) and 0 (0.3); sum of squares 1.00 + 1.25 = 2.25
    # 2 * sqrt(2.25 / (|S| * lambda)) = 2 * sqrt(2.25 / 20) = 2 * sqrt(0.1125) = 0.6708203932
    assert paper_sigma(FITNESS, SIGMAS, [5, 5, 5, 5]) == pytest.approx(0.6708203932, rel=1e-9)


def test_eq6_ignores_the_worse_half():
    worse = [s.copy() for s in SIGMAS]
    worse[2] *= 100.0  # client 2 has the worst fitness: its step sizes must not matter
    assert paper_sigma(FITNESS, worse, [5] * 4) == paper_sigma(FITNESS, SIGMAS, [5] * 4)


def test_eq6_with_an_odd_client_count_keeps_the_floor_of_half():
    # |S| = 3 -> |S|/2 rounds down to 1 client (index 1): 2 * sqrt(1.0 / 15) = 0.5163977795
    assert paper_sigma(FITNESS[:3], SIGMAS[:3], [5] * 3) == pytest.approx(0.5163977795, rel=1e-9)


def test_reference_sigma_before_tell():
    # sum over all clients 1.25 + 1.00 + 8.00 + 2.00 = 12.25; / m=4 / mu_local=2 = 1.53125; sqrt = 1.2374368671
    assert reference_sigma(SIGMAS, 2) == pytest.approx(1.2374368671, rel=1e-9)


@pytest.mark.parametrize(
    "after, before, previous, expected",
    [
        (0.9, 1.2, 1.0, 0.75),  # ratio 0.75: neither floor nor cap binds
        (0.3, 1.2, 1.0, 0.5),  # ratio 0.25 -> 0.25 lifted to the 0.5 floor
        (1.5, 1.0, 0.8, 0.8),  # ratio 1.5 -> 1.2 capped at the previous 0.8: the step never grows
        (0.5, 1.0, 0.4, 0.4),  # 0.2 floored to 0.5, then capped at 0.4: below 0.5 the cap undoes the floor
    ],
)
def test_reference_sigma_sent(after, before, previous, expected):
    assert reference_sigma_sent(after, before, previous) == pytest.approx(expected)


def test_eq7_is_clean_over_perturbed_loss():
    assert eq7_fitness(np.array([0.6, 0.9]), np.array([1.2, 0.3])) == pytest.approx([0.5, 3.0])


def test_eq7_survives_a_zero_perturbed_loss():
    assert np.isfinite(eq7_fitness(np.array([0.5]), np.array([0.0]))).all()


LOGITS = np.array([[[2.0, 0.0], [0.0, 1.0]]])  # one candidate, two examples, two label words
LABELS = np.array([0, 0])


def test_cross_entropy_over_label_words():
    # log(1 + e^-2) = 0.1269280110, log(1 + e^1) = 1.3132616875; mean 0.7200948493
    loss, _ = loss_and_metrics(LOGITS, LABELS, "ce")
    assert loss[0] == pytest.approx(0.7200948493, rel=1e-9)


def test_hinge_margin_two_as_multi_margin_loss():
    # example 1: max(0, 2 - 2 + 0) = 0; example 2: max(0, 2 - 0 + 1) = 3 -> 3 / 2 classes = 1.5; (0 + 1.5) / 2
    loss, _ = loss_and_metrics(LOGITS, LABELS, "hinge")
    assert loss[0] == pytest.approx(0.75)
    # three classes, y = 2: (max(0, 2+1+1) + max(0, 2+1+0.5)) / 3 = 7.5 / 3
    loss3, _ = loss_and_metrics(np.array([[[1.0, 0.5, -1.0]]]), np.array([2]), "hinge")
    assert loss3[0] == pytest.approx(2.5)


def test_hinge_matches_torch_multi_margin_loss():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(1, 7, 4)), rng.integers(4, size=7)
    expected = torch.nn.MultiMarginLoss(margin=2.0)(torch.tensor(x[0]), torch.tensor(y)).item()
    assert loss_and_metrics(x, y, "hinge")[0][0] == pytest.approx(expected, rel=1e-9)


def test_perf_is_minus_accuracy_and_confusion_counts_predictions():
    loss, conf = loss_and_metrics(LOGITS, LABELS, "perf")
    assert loss[0] == pytest.approx(-0.5)
    assert conf[0].tolist() == [[1, 1], [0, 0]]  # rows: true label, columns: prediction


def test_metrics_from_confusion():
    conf = np.array([[5, 2], [1, 4]])
    assert metric_from_confusion(conf, "acc") == pytest.approx(9 / 12)
    assert metric_from_confusion(conf, "f1") == pytest.approx(8 / 11)  # tp 4, fp 2, fn 1


def test_pycma_clip_threshold_at_d500():
    assert mahalanobis_clip_threshold(500) == pytest.approx(24.3527, abs=1e-4)
