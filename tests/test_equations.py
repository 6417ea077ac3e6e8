"""The paper's equations and the loss/metric definitions, against numbers worked out by hand."""

import numpy as np
import pytest

from fedbpt.core.algorithm.aggregation import (
    mahalanobis_clip_threshold,
    paper_sigma,
    reference_sigma,
    reference_sigma_sent,
    sigma_before_tell,
    sigma_sent,
)
from fedbpt.core.algorithm.search import eq7_fitness
from fedbpt.core.models.scorer import loss_and_metrics, metric_from_confusion

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
        (0.9, 1.2, 1.0, 0.75),  # ratio 0.75: 0.75
        (0.3, 1.2, 1.0, 0.25),  # ratio 0.25: 0.25, below the 0.5 the code names; its floor never binds
        (1.5, 1.0, 0.8, 1.2),  # ratio 1.5: CSA grew the step, so the sent step grows too: 1.2 > 0.8
        (0.5, 1.0, 0.4, 0.2),  # ratio 0.5 from 0.4: 0.2
    ],
)
def test_reference_sent_step_code_reduces_to_the_ratio(after, before, previous, expected):
    # the second clamp compares with local_sigma_current, set to the new step before the clamps: it undoes the first
    assert reference_sigma_sent(after, before, previous) == pytest.approx(expected, rel=1e-12)


def test_paper_and_reference_send_the_ratio_eq6_sent_sends_the_post_tell_step():
    # before 0.8, CSA turned it into 0.88 (ratio 1.1), previous sent step 1.0
    assert sigma_sent("paper", 0.88, 0.8, 1.0) == pytest.approx(1.1, rel=1e-12)
    assert sigma_sent("reference", 0.88, 0.8, 1.0) == pytest.approx(1.1, rel=1e-12)
    assert sigma_sent("eq6_sent", 0.88, 0.8, 1.0) == 0.88


def test_sent_step_falls_below_half_over_a_run_of_shrinking_rounds():
    # CSA shrinks the corrected step by 10% each round: 0.6 -> 0.54 -> 0.486 -> 0.4374 -> 0.39366
    sent = [0.6]
    for _ in range(4):
        sent.append(sigma_sent("paper", 0.9 * 0.7, 0.7, sent[-1]))
    assert sent == pytest.approx([0.6, 0.54, 0.486, 0.4374, 0.39366], rel=1e-12)


def test_sigma_before_tell_picks_eq6_or_the_reference_formula():
    assert sigma_before_tell("paper", FITNESS, SIGMAS, [5] * 4) == pytest.approx(0.6708203932, rel=1e-9)
    assert sigma_before_tell("eq6_sent", FITNESS, SIGMAS, [5] * 4) == pytest.approx(0.6708203932, rel=1e-9)
    # lambda = 5 -> pycma's mu_local = 2
    assert sigma_before_tell("reference", FITNESS, SIGMAS, [5] * 4) == pytest.approx(1.2374368671, rel=1e-9)


def test_eq7_mean_ratio_divides_the_mean_losses():
    # clean (0.6, 0.2), perturbed (1.2, 0.4): 0.4 / 0.8 = 0.5; second candidate (0.9, 0.3) / (0.3, 0.3): 0.6 / 0.3 = 2
    clean = np.array([[0.6, 0.2], [0.9, 0.3]])
    pert = np.array([[1.2, 0.4], [0.3, 0.3]])
    assert eq7_fitness(clean, pert, "mean_ratio") == pytest.approx([0.5, 2.0])


def test_eq7_per_example_averages_the_ratios():
    # (0.6 / 1.2 + 0.2 / 0.1) / 2 = (0.5 + 2) / 2 = 1.25; mean_ratio would give 0.4 / 0.65 = 0.6154
    clean, pert = np.array([[0.6, 0.2]]), np.array([[1.2, 0.1]])
    assert eq7_fitness(clean, pert, "per_example") == pytest.approx([1.25])
    assert eq7_fitness(clean, pert, "mean_ratio") == pytest.approx([0.4 / 0.65])


def test_eq7_survives_a_zero_perturbed_loss():
    for form in ("mean_ratio", "per_example"):
        assert np.isfinite(eq7_fitness(np.array([[0.5]]), np.array([[0.0]]), form)).all()


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


def test_eq7_cannot_see_a_label_bias_that_the_perturbed_copy_shares():
    from bench.eq7_bias import objective_curves

    # both examples lean to label 1 by 2 nats, label 0 and label 1 once each; the perturbed copy leans the same way.
    # clean ce at b = 0: (log(1 + e^2) + log(1 + e^-2)) / 2 = (2.1269280 + 0.1269280) / 2 = 1.1269280; a bias of -2
    # on label 1 removes the lean: log 2 = 0.6931472. Eq. 7 divides the two equal losses: 1 at every b.
    logits, labels = np.array([[0.0, 2.0], [0.0, 2.0]]), np.array([0, 1])
    curves = objective_curves([(logits, labels)], [[logits.copy()]], [-2.0, 0.0])
    assert curves["clean loss"] == pytest.approx([0.6931472, 1.1269280], rel=1e-6)
    assert curves["Eq. 7 mean_ratio"] == pytest.approx([1.0, 1.0])
    assert curves["Eq. 7 per_example"] == pytest.approx([1.0, 1.0])
