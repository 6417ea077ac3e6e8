"""k-shot sampling, IID and Dirichlet partitions, site shards, local and hub loading."""

import numpy as np
import pytest
from conftest import write_jsonl

from fedbpt.data import k_shot_indices, load_split, partition, site_data, site_index
from fedbpt.tasks import ConfigError, get_task

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
    with pytest.raises(ConfigError, match="--k_shot"):
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


def test_dirichlet_partition_covers_everyone_and_skews_labels():
    labels = np.repeat(np.arange(2), 200)
    skewed = partition(labels, 10, False, 0.1, 2, seed=4)
    _check_partition(skewed, len(labels))
    share = np.array([labels[p].mean() for p in skewed])
    # alpha = 0.1 concentrates each class on few clients: most shards are (nearly) single-class
    assert np.mean((share < 0.1) | (share > 0.9)) >= 0.6
    iid_share = np.array([labels[p].mean() for p in partition(labels, 10, True, 0.1, 2, seed=4)])
    assert np.all(np.abs(iid_share - 0.5) < 0.2)


def test_dirichlet_gives_every_client_an_example_even_when_the_draw_does_not():
    labels = np.repeat(np.arange(2), 6)  # 12 examples, 10 clients, tiny alpha: empty shards are drawn
    for seed in range(20):
        _check_partition(partition(labels, 10, False, 0.05, 2, seed=seed), 12)


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
    with pytest.raises(ConfigError, match="--data_dir"):
        load_split(get_task("ag_news"), "test", None)


def test_real_sst2_copy_loads_with_the_hub_schema(shared_sst2):
    task = get_task("sst2")
    val = load_split(task, "validation", shared_sst2)
    assert len(val) == 872 and np.bincount(val.labels).tolist() == [428, 444]
