"""What a site reveals: by default its uploads carry no per-class counts of its own train or dev data."""

from __future__ import annotations

import helpers
import numpy as np
import pytest

from fedbpt.core.algorithm.search import GlobalState
from fedbpt.core.server.summary import RunSummary, pooled, split_metric
from fedbpt.core.wire import decode_eval, encode_state
from fedbpt.errors import PayloadError

D = 16


def site_upload(tiny_model_dir, toy_data_dir, cache, **kw) -> tuple[dict, np.ndarray]:
    """site-2's first-round upload on a label-skewed split, and its train labels (what the server must not learn)."""
    from fedbpt.core.site.runtime import SiteRuntime

    cfg = helpers.make_cfg(
        model_name=tiny_model_dir,
        data_dir=toy_data_dir,
        num_clients=2,
        iid=False,
        alpha_dir=0.5,
        k_shot=6,
        n_prompt_tokens=2,
        intrinsic_dim=D,
        local_iter=2,
        local_popsize=3,
        seed=5,
        **kw,
    )
    runtime = SiteRuntime(cfg, "site-2", cache)
    try:
        state = encode_state(GlobalState(0, np.zeros(D), 1.0, None), "diag")
        return runtime.run_round(state, with_eval=True), runtime.train.labels
    finally:
        runtime.scorer.close()


def test_a_default_upload_holds_no_label_histogram(tiny_model_dir, toy_data_dir, tmp_path):
    up, labels = site_upload(tiny_model_dir, toy_data_dir, str(tmp_path))
    assert np.bincount(labels, minlength=2).min() < np.bincount(labels, minlength=2).max()  # a skewed shard
    # the only arrays are the search result; every other field is one number
    assert {k for k, v in up.items() if isinstance(v, np.ndarray)} == {"mean", "sigmas"}
    assert all(np.ndim(v) == 0 for k, v in up.items() if k not in ("mean", "sigmas"))
    reports = decode_eval(up, 2)
    assert set(reports) == {f"{s}_{k}" for s in ("train", "dev") for k in ("loss", "n", "correct")}
    assert reports["train_n"] == len(labels) and 0 <= reports["train_correct"] <= len(labels)


def test_full_site_metrics_send_the_confusion_matrix_whose_rows_are_the_label_histogram(
    tiny_model_dir, toy_data_dir, tmp_path
):
    up, labels = site_upload(tiny_model_dir, toy_data_dir, str(tmp_path), site_metrics="full")
    np.testing.assert_array_equal(up["train_confusion"].sum(1), np.bincount(labels, minlength=2))
    assert "train_correct" not in up


def test_correct_counts_pool_to_the_accuracy_over_all_examples():
    # 7 of 8 right at site-1 (counts), 5 of 8 at site-2 (confusion, --site_metrics full): 12 of 16 = 0.75;
    # loss weighted by examples: (0.2 * 8 + 0.6 * 8) / 16 = 0.4
    a = {"train_loss": 0.2, "train_n": 8, "train_correct": 7}
    b = {"train_loss": 0.6, "train_n": 8, "train_confusion": np.array([[2, 2], [1, 3]])}
    acc, loss = pooled({"site-1": a, "site-2": b}, "train", "acc")
    assert acc == pytest.approx(0.75) and loss == pytest.approx(0.4)
    # F1 needs every confusion matrix: from counts the pooled value is the accuracy, and the summary says so
    f1_or_acc, _ = pooled({"site-1": a, "site-2": b}, "train", "f1")
    assert f1_or_acc == pytest.approx(0.75)
    only_conf, _ = pooled({"site-2": b}, "train", "f1")  # tp 3, fp 2, fn 1: 2*3 / (2*3 + 2 + 1) = 6/9
    assert only_conf == pytest.approx(6 / 9)
    assert split_metric("f1", "dev", "pooled") == "acc" and split_metric("f1", "test", "pooled") == "f1"
    assert split_metric("f1", "dev", "full") == "f1" and split_metric("acc", "dev", "pooled") == "acc"
    summary = RunSummary(helpers.make_cfg(task_name="mrpc"), "f1")
    assert summary.to_dict()["split_metrics"] == {"train": "acc", "dev": "acc", "test": "f1"}
    assert "best round by dev acc" in summary.best_line()


@pytest.mark.parametrize(
    "report, message",
    [
        ({"train_loss": 0.1, "train_n": 4, "train_correct": 5}, r"'train_correct' must be an integer in \[0, 4\]"),
        ({"train_loss": 0.1, "train_n": 4, "train_correct": 2.0}, "'train_correct' must be an integer"),
        ({"train_loss": 0.1, "train_n": 4, "train_correct": -1}, "'train_correct' must be an integer"),
        (
            {"train_loss": 0.1, "train_n": 2, "train_correct": 1, "train_confusion": np.eye(2, dtype=np.int64)},
            "'train_confusion' and 'train_correct' both came",
        ),
    ],
)
def test_malformed_correct_counts_are_rejected(report, message):
    with pytest.raises(PayloadError, match=message):
        decode_eval(report, 2)
