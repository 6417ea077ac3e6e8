"""k-shot sampling, IID and Dirichlet partitions (hsu, per_class), the least-norm size QP, site shards, loading."""

import numpy as np
import pytest
from conftest import write_jsonl

from fedbpt.core.data.splits import (
    class_takes,
    k_shot_indices,
    least_norm_sizes,
    load_split,
    partition,
    site_data,
    site_index,
)
from fedbpt.core.data.tasks import get_task
from fedbpt.errors import ConfigError

LABELS = np.repeat(np.arange(3), [50, 40, 30])


def test_k_shot_takes_k_per_class_for_train_and_the_next_k_for_dev():
    tr, dv = k_shot_indices(LABELS, 8, 3, seed=5)
    assert np.bincount(LABELS[tr]).tolist() == [8, 8, 8]
    assert np.bincount(LABELS[dv]).tolist() == [8, 8, 8]
    assert not set(tr) & set(dv)


def test_k_shot_is_seeded():
    a, b, c = (k_shot_indices(LABELS, 8, 3, s) for s in (5, 5, 6))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


def test_k_shot_larger_than_a_class_allows_is_a_config_error():
    with pytest.raises(ConfigError, match="k_shot"):
        k_shot_indices(LABELS, 16, 3, seed=0)  # class 2 has 30 < 2 * 16


def _check_partition(parts, n):
    flat = np.concatenate(parts)
    assert sorted(flat.tolist()) == list(range(n))  # every example exactly once: no overlap, nothing lost
    assert all(len(p) >= 1 for p in parts)


def test_iid_partition_is_even_disjoint_and_seeded():
    parts = partition(LABELS, 7, True, 1.0, 3, seed=3)
    _check_partition(parts, len(LABELS))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    again = partition(LABELS, 7, True, 1.0, 3, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


SCHEMES = ("hsu", "per_class")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_dirichlet_partition_covers_everyone_and_skews_labels(scheme):
    labels = np.repeat(np.arange(2), 200)
    skewed = partition(labels, 10, False, 0.1, 2, seed=4, scheme=scheme)
    _check_partition(skewed, len(labels))
    share = np.array([labels[p].mean() for p in skewed])
    # alpha = 0.1 concentrates each class on few clients: most shards are (nearly) single-class
    assert np.mean((share < 0.1) | (share > 0.9)) >= 0.6
    iid_share = np.array([labels[p].mean() for p in partition(labels, 10, True, 0.1, 2, seed=4, scheme=scheme)])
    assert np.all(np.abs(iid_share - 0.5) < 0.2)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize(
    "labels",
    [
        np.repeat(np.arange(2), 40),  # SST-2-like k-shot sample
        np.repeat(np.arange(4), 40),  # AG-News-like
        np.repeat(np.arange(3), [50, 40, 30]),  # unbalanced
        np.repeat(np.arange(14), 20),  # DBPedia-like: more classes than clients, the QP has no exact solution
    ],
)
def test_non_iid_partition_assigns_every_example_exactly_once(labels, scheme):
    num_classes = int(labels.max()) + 1
    for alpha in (0.1, 0.5, 1.0, 10.0):
        for seed in range(10):
            _check_partition(partition(labels, 10, False, alpha, num_classes, seed, scheme=scheme), len(labels))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_dirichlet_gives_every_client_an_example_even_when_the_draw_does_not(scheme):
    labels = np.repeat(np.arange(2), 6)  # 12 examples, 10 clients, tiny alpha: empty shards are drawn
    for seed in range(20):
        _check_partition(partition(labels, 10, False, 0.05, 2, seed=seed, scheme=scheme), 12)
    labels = np.repeat(np.arange(4), 3)  # 12 examples, 4 classes
    for seed in range(20):
        _check_partition(partition(labels, 10, False, 0.05, 4, seed=seed, scheme=scheme), 12)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_non_iid_partition_is_seeded(scheme):
    labels = np.repeat(np.arange(4), 40)
    a, b, c = (partition(labels, 10, False, 0.5, 4, s, scheme=scheme) for s in (7, 7, 8))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_schemes_differ_and_an_unknown_scheme_is_a_config_error():
    labels = np.repeat(np.arange(2), 40)
    hsu, per_class = (partition(labels, 10, False, 0.5, 2, 3, scheme=s) for s in SCHEMES)
    assert not all(np.array_equal(x, y) for x, y in zip(hsu, per_class))
    with pytest.raises(ConfigError, match="partition"):
        partition(labels, 10, False, 0.5, 2, 3, scheme="shards")


def _old_per_class(labels, num_clients, alpha, num_classes, seed):
    """The non-IID split as it was before the hsu scheme, written independently: per_class must stay bit-identical."""
    rng = np.random.default_rng(seed)
    shards = [np.zeros(0, dtype=np.int64) for _ in range(num_clients)]
    for c in range(num_classes):
        members = rng.permutation(np.where(labels == c)[0])
        shares = rng.dirichlet([alpha] * num_clients)
        bounds = np.concatenate([[0], (np.cumsum(shares)[:-1] * len(members)).astype(int), [len(members)]])
        for k in range(num_clients):
            shards[k] = np.concatenate([shards[k], members[bounds[k] : bounds[k + 1]]])
    shards = [list(s) for s in shards]
    for k in range(num_clients):
        if len(shards[k]) == 0:
            sizes = [len(s) for s in shards]
            donor = sizes.index(max(sizes))  # the first of the largest
            shards[k].append(shards[donor].pop())
    return [np.sort(np.array(s, dtype=np.int64)) for s in shards]


def test_per_class_is_the_old_split_bit_for_bit():
    for labels in (np.repeat(np.arange(3), [50, 40, 30]), np.repeat(np.arange(2), 6)):
        num_classes = int(labels.max()) + 1
        for alpha in (0.05, 0.5, 1.0):
            for seed in range(10):
                new = partition(labels, 10, False, alpha, num_classes, seed, scheme="per_class")
                old = _old_per_class(labels, 10, alpha, num_classes, seed)
                assert all(np.array_equal(a, b) for a, b in zip(new, old))


def test_least_norm_sizes_hand_checked():
    # one pure client per class plus a half-half client, 10 of each class: x1 = x2 = 10 - t/2, x3 = t;
    # min 2 (10 - t/2)^2 + t^2 at t = 20/3, so all three sizes are 20/3
    mix = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    np.testing.assert_allclose(least_norm_sizes(mix, np.array([10, 10])), [20 / 3, 20 / 3, 20 / 3], atol=1e-9)
    # counts 20, 2: the unconstrained optimum t = 22/3 would make x2 = 2 - t/2 negative, so x2 = 0 binds: t = 4
    np.testing.assert_allclose(least_norm_sizes(mix, np.array([20, 2])), [18.0, 0.0, 4.0], atol=1e-9)
    # two clients, two classes, independent mixes: the unique solution of the 2x2 system
    mix = np.array([[0.75, 0.25], [0.25, 0.75]])
    np.testing.assert_allclose(least_norm_sizes(mix, np.array([30, 10])), [40.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(least_norm_sizes(mix, np.array([20, 20])), [20.0, 20.0], atol=1e-9)


def test_least_norm_sizes_meet_the_optimality_conditions_on_random_draws():
    """KKT of min ||x||^2, A x = n, x >= 0: x = max(0, A^T lam) for some lam; checked wherever a solution exists."""
    feasible = 0
    for seed in range(60):
        rng = np.random.default_rng(seed)
        num_classes, num_clients = (2, 10) if seed % 2 else (4, 10)
        counts = rng.integers(10, 60, size=num_classes)
        mix = rng.dirichlet(0.5 * counts / counts.sum(), size=num_clients)
        x = least_norm_sizes(mix, counts)
        a = mix.T
        assert x.min() >= 0
        if np.abs(a @ x - counts).max() > 1e-6:
            continue  # no exact solution: covered by the fallback test
        feasible += 1
        on = x > 1e-9
        lam = np.linalg.lstsq(a[:, on].T, x[on], rcond=None)[0]
        np.testing.assert_allclose(a[:, on].T @ lam, x[on], atol=1e-6)
        assert (a[:, ~on].T @ lam <= 1e-6).all()
    assert feasible >= 30


def test_least_norm_sizes_without_an_exact_solution_fit_the_counts_as_closely_as_possible():
    # both clients hold more of class 1 than the data does: no x >= 0 meets (10, 10); the closest fit is the
    # projection of (10, 10) on the ray of the client richest in class 0: x1 = (10 * 0.3 + 10 * 0.7) / 0.58
    x = least_norm_sizes(np.array([[0.3, 0.7], [0.2, 0.8]]), np.array([10, 10]))
    np.testing.assert_allclose(x, [10 / 0.58, 0.0], atol=1e-9)


def test_class_takes_floor_the_requests_and_shrink_an_over_asked_class_evenly():
    want = np.array([[2.9999999999, 6.0], [1.5, 6.0]])  # class 1: 12 asked, 6 there
    takes = class_takes(want, np.array([10, 6]))
    assert takes.tolist() == [[3, 3], [1, 3]]  # not [6, 0]: the first client is not served first


def _mean_tv(labels, parts, num_classes):
    """Mean over clients of the total-variation distance between the client's class mix and the global mix."""
    glob = np.bincount(labels, minlength=num_classes) / len(labels)
    return np.mean([0.5 * np.abs(np.bincount(labels[p], minlength=num_classes) / len(p) - glob).sum() for p in parts])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_smaller_alpha_gives_more_label_skew(scheme):
    for num_classes in (2, 4):
        labels = np.repeat(np.arange(num_classes), 40)
        tv = {
            alpha: np.mean(
                [
                    _mean_tv(labels, partition(labels, 10, False, alpha, num_classes, s, scheme=scheme), num_classes)
                    for s in range(10)
                ]
            )
            for alpha in (0.1, 1.0)
        }
        assert tv[0.1] > tv[1.0] + 0.1
        iid = np.mean(
            [_mean_tv(labels, partition(labels, 10, True, 0.1, num_classes, s), num_classes) for s in range(10)]
        )
        assert tv[1.0] > iid


def test_site_index_maps_site_names_to_shards():
    assert site_index("site-1", 3) == 0
    assert site_index("site-3", 3) == 2
    for bad in ("site-4", "site-0", "hospital-a"):
        with pytest.raises(ConfigError, match="site"):
            site_index(bad, 3)


def test_sites_get_disjoint_shards_of_the_k_shot_sample(toy_data_dir):
    task = get_task("sst2")
    shards = [site_data(task, toy_data_dir, 10, 4, i, False, 1.0, 11) for i in range(4)]
    train = [t for s in shards for t in s.train.texts]
    dev = [t for s in shards for t in s.dev.texts]
    assert len(train) == 20 and len(dev) == 20
    assert np.bincount(np.concatenate([s.train.labels for s in shards])).tolist() == [10, 10]
    # the union is the k-shot sample: nothing in common between train and dev, nothing repeated
    assert len(set(train) | set(dev)) == len(set(train)) + len(set(dev))
    again = site_data(task, toy_data_dir, 10, 4, 2, False, 1.0, 11)
    assert again.train.texts == shards[2].train.texts


@pytest.mark.parametrize("scheme", SCHEMES)
def test_dev_shards_stay_iid_under_non_iid_train(toy_data_dir, scheme):
    task = get_task("sst2")
    shards = [site_data(task, toy_data_dir, 10, 3, i, False, 0.05, 11, scheme=scheme) for i in range(3)]
    assert [len(s.dev) for s in shards] == [7, 7, 6]  # 20 dev examples split evenly, as under --iid 1
    iid = site_data(task, toy_data_dir, 10, 3, 0, True, 0.05, 11)
    assert shards[0].dev.texts == iid.dev.texts  # the dev split ignores --iid and --partition
    assert sum(len(s.train) for s in shards) == 20


def test_site_data_passes_the_scheme_to_the_train_split(toy_data_dir):
    task = get_task("sst2")
    by_scheme = {
        s: [site_data(task, toy_data_dir, 10, 4, i, False, 0.5, 11, scheme=s) for i in range(4)] for s in SCHEMES
    }
    assert [x.train.texts for x in by_scheme["hsu"]] != [x.train.texts for x in by_scheme["per_class"]]
    default = site_data(task, toy_data_dir, 10, 4, 1, False, 0.5, 11)
    assert default.train.texts == by_scheme["hsu"][1].train.texts


def test_local_csv_and_jsonl_load_the_same_rows(tmp_path, toy_data_dir):
    import csv

    jl = load_split(get_task("sst2"), "validation", toy_data_dir)
    with open(tmp_path / "validation.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "label"])
        w.writerows([(t[0], int(y)) for t, y in zip(jl.texts, jl.labels)])
    cs = load_split(get_task("sst2"), "validation", str(tmp_path))
    assert cs.texts == jl.texts and np.array_equal(cs.labels, jl.labels)


def test_wrong_schema_names_the_missing_column(tmp_path):
    write_jsonl(str(tmp_path / "train.jsonl"), ["a b"], [0], column="text")
    with pytest.raises(ConfigError, match="sentence"):
        load_split(get_task("sst2"), "train", str(tmp_path))


def test_missing_split_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="train"):
        load_split(get_task("sst2"), "train", str(tmp_path))


def test_snli_drops_unlabelled_pairs(tmp_path):
    import json

    with open(tmp_path / "test.jsonl", "w") as f:
        for y in (0, -1, 2, 1):
            f.write(json.dumps({"premise": "p", "hypothesis": f"h{y}", "label": y}) + "\n")
    ex = load_split(get_task("snli"), "test", str(tmp_path))
    assert ex.labels.tolist() == [0, 2, 1]


def test_unreachable_hub_names_data_dir(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")  # .invalid never resolves (RFC 2606)
    with pytest.raises(ConfigError, match="data_dir"):
        load_split(get_task("ag_news"), "test", None)


def test_real_sst2_copy_loads_with_the_hub_schema(shared_sst2):
    task = get_task("sst2")
    val = load_split(task, "validation", shared_sst2)
    assert len(val) == 872 and np.bincount(val.labels).tolist() == [428, 444]


def test_dev_shot_widens_dev_and_leaves_train_as_it_was():
    tr, dv = k_shot_indices(LABELS, 8, 3, seed=5)
    tr2, dv2 = k_shot_indices(LABELS, 8, 3, seed=5, dev_shot=20)
    np.testing.assert_array_equal(tr, tr2)  # the same training examples: the search is unchanged
    assert np.bincount(LABELS[dv2]).tolist() == [20, 20, 20]
    assert set(dv) <= set(dv2) and not set(tr2) & set(dv2)  # the k-shot dev set, and more after it
    with pytest.raises(ConfigError, match=r"needs 31 training examples of class 2 .* lower k_shot or dev_shot"):
        k_shot_indices(LABELS, 8, 3, seed=0, dev_shot=23)  # class 2 has 30
