"""The per-site set-up cache: a read entry is the fresh build, a changed key misses, a damaged entry is rebuilt, and
no two sites share one."""

from __future__ import annotations

import json
import os
import shutil

import helpers
import numpy as np
import pytest

from fedbpt.core.models import scorer as scorer_module
from fedbpt.core.server.inprocess import run_in_process
from fedbpt.core.site import cache as cache_module
from fedbpt.core.site.cache import CACHE_DIR, SOURCES, SetupCache, complete_model_folder
from fedbpt.core.site.runtime import RuntimePool, SiteRuntime, go_hub_offline


@pytest.fixture
def cfg(tiny_model_dir, toy_data_dir) -> dict:
    return helpers.make_cfg(
        model_name=tiny_model_dir,
        data_dir=toy_data_dir,
        task_name="sst2",
        num_clients=3,
        num_rounds=2,
        k_shot=8,
        n_prompt_tokens=6,
        intrinsic_dim=20,
        local_iter=2,
        eval_clients="site-1",
    )


def build(cfg: dict, root, site: str = "site-1") -> SiteRuntime:
    """A runtime built as a fresh process would build it: no model or A from this process's caches."""
    scorer_module._PROJECTION_CACHE.clear()
    runtime = SiteRuntime(cfg, site, str(root), setup_cache=True)
    runtime.scorer.close()
    return runtime


def entries(root, site: str = "site-1") -> list[str]:
    folder = os.path.join(str(root), CACHE_DIR, site)
    return sorted(n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n, "meta.json")))


def assert_same_encoding(a, b) -> None:
    assert len(a.ids) == len(b.ids) and a.dropped == b.dropped
    for x, y in zip(a.ids, b.ids):
        assert x.dtype == y.dtype and np.array_equal(x, y)
    for x, y in zip(a.text_mask, b.text_mask):
        assert x.dtype == y.dtype and np.array_equal(x, y)
    for name in ("mask_pos", "labels", "lengths", "order"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


def test_a_read_entry_is_the_fresh_build(cfg, tmp_path):
    plain = SiteRuntime(cfg, "site-1", str(tmp_path / "plain"))  # no cache at all
    plain.scorer.close()
    first = build(cfg, tmp_path)
    again = build(cfg, tmp_path)
    assert (plain.cache_state, first.cache_state, again.cache_state) == ("off", "written", "read")
    for runtime in (first, again):
        for split in ("train", "dev", "test"):
            assert_same_encoding(getattr(plain, split), getattr(runtime, split))
        assert runtime.test_examples.texts == plain.test_examples.texts
        assert np.array_equal(runtime.test_examples.labels, plain.test_examples.labels)
        assert np.array_equal(runtime.scorer.A_t.numpy(), plain.scorer.A_t.numpy())
        assert runtime.scorer.proj_std == plain.scorer.proj_std
    z = np.random.default_rng(0).normal(size=(3, cfg.intrinsic_dim))
    assert np.array_equal(plain.scorer.label_logits(z, plain.train), again.scorer.label_logits(z, again.train))


def test_a_changed_key_misses_and_a_run_only_field_does_not(cfg, tmp_path, toy_data_dir):
    build(cfg, tmp_path)
    assert build(cfg.replace(num_rounds=9, local_iter=5, loss_type="hinge"), tmp_path).cache_state == "read"
    assert build(cfg.replace(seed=cfg.seed + 1), tmp_path).cache_state == "written"
    assert build(cfg.replace(k_shot=6), tmp_path).cache_state == "written"
    data = tmp_path / "data"
    shutil.copytree(toy_data_dir, data)
    copied = cfg.replace(data_dir=str(data))
    assert build(copied, tmp_path).cache_state == "written"  # another file
    assert build(copied, tmp_path).cache_state == "read"
    with open(data / "train.jsonl", "a") as f:  # the same file, changed
        f.write(json.dumps({"idx": 10**6, "sentence": "a new film", "label": 1}) + "\n")
    assert build(copied, tmp_path).cache_state == "written"
    assert len(entries(tmp_path)) == 4  # the most recently used entries are kept (KEEP), the oldest removed


@pytest.mark.parametrize("damage", ["flip_projection", "truncate_encodings", "other_key", "no_meta"])
def test_a_damaged_entry_is_rebuilt_never_used(cfg, tmp_path, damage, caplog):
    first = build(cfg, tmp_path)
    (name,) = entries(tmp_path)
    folder = tmp_path / CACHE_DIR / "site-1" / name
    if damage == "flip_projection":
        raw = bytearray((folder / "projection.npy").read_bytes())
        raw[-7] ^= 0xFF  # one float of A, the header intact
        (folder / "projection.npy").write_bytes(bytes(raw))
    elif damage == "truncate_encodings":
        raw = (folder / "encodings.npz").read_bytes()
        (folder / "encodings.npz").write_bytes(raw[: len(raw) // 2])
    elif damage == "other_key":
        meta = json.loads((folder / "meta.json").read_text())
        meta["key"]["config"]["seed"] += 1
        (folder / "meta.json").write_text(json.dumps(meta))
    else:
        (folder / "meta.json").unlink()
    rebuilt = build(cfg, tmp_path)
    assert rebuilt.cache_state == "written"
    assert np.array_equal(rebuilt.scorer.A_t.numpy(), first.scorer.A_t.numpy())
    assert_same_encoding(first.train, rebuilt.train)
    assert build(cfg, tmp_path).cache_state == "read"  # replaced by a good entry
    assert entries(tmp_path) == [name]
    if damage != "no_meta":
        assert any("unusable" in r.getMessage() for r in caplog.records)


def test_the_code_key_reads_every_source_it_names(tmp_path, monkeypatch):
    """Each module named in SOURCES exists (a moved module would otherwise drop out of the key unnoticed), and a change
    to any of them changes the key."""
    core = os.path.dirname(os.path.dirname(os.path.abspath(cache_module.__file__)))
    assert [f for f in SOURCES if not os.path.isfile(os.path.join(core, f))] == []
    copy = tmp_path / "core"
    shutil.copytree(core, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(cache_module, "__file__", str(copy / "site" / "cache.py"))
    before = cache_module._code_digest()
    assert before == cache_module._code_digest()
    for name in SOURCES:
        path = copy / name
        original = path.read_bytes()
        path.write_bytes(original + b"\n")
        assert cache_module._code_digest() != before, name
        path.write_bytes(original)
    assert cache_module._code_digest() == before


def test_two_sites_never_share_an_entry(cfg, tmp_path):
    one, two = build(cfg, tmp_path, "site-1"), build(cfg, tmp_path, "site-2")
    assert one.cache_state == two.cache_state == "written"
    (name1,), (name2,) = entries(tmp_path, "site-1"), entries(tmp_path, "site-2")
    assert name1 != name2
    assert not np.array_equal(np.concatenate(one.train.ids), np.concatenate(two.train.ids))
    assert two.test is None and one.test is not None  # only the eval site keeps a test set
    # site-1's entry placed where site-2 would look for its own is refused: its key names site-1
    site2 = tmp_path / CACHE_DIR / "site-2"
    shutil.rmtree(site2 / name2)
    shutil.copytree(tmp_path / CACHE_DIR / "site-1" / name1, site2 / name2)
    again = build(cfg, tmp_path, "site-2")
    assert again.cache_state == "written"
    assert_same_encoding(two.train, again.train)


def test_setup_seconds_are_reported_once(cfg, tmp_path):
    """The first task of a runtime reports what it spent building it; later tasks reuse it and report 0."""
    pool = RuntimePool(cfg, str(tmp_path))
    try:
        summary = run_in_process(cfg, pool)
    finally:
        pool.close()
    first, second = summary.rounds
    assert set(first["setup_seconds"]) == {"site-1", "site-2", "site-3"}
    assert all(v > 0 for v in first["setup_seconds"].values())
    assert all(v >= 0 for v in first["import_seconds"].values())
    assert set(second["setup_seconds"].values()) == set(second["import_seconds"].values()) == {0.0}


def test_a_hub_id_resolves_to_its_snapshot_and_the_process_goes_offline(tiny_model_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    hub = tmp_path / "hub"
    snapshot = hub / "models--org--tiny" / "snapshots" / "abc123"
    shutil.copytree(tiny_model_dir, snapshot)
    (hub / "models--org--tiny" / "refs").mkdir()
    (hub / "models--org--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    store = SetupCache(str(tmp_path / "root"), "site-1")
    assert store.local_model("org/tiny") is None  # never resolved here: the first set-up loads from the hub
    assert store.record_model("org/tiny") == str(snapshot)
    assert store.local_model("org/tiny") == str(snapshot) and complete_model_folder(str(snapshot))
    assert SetupCache(str(tmp_path / "root"), "site-2").local_model("org/tiny") is None  # per site
    (snapshot / "model.safetensors").unlink()
    assert store.local_model("org/tiny") is None  # no longer whole: back to the hub
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    go_hub_offline()
    assert os.environ["HF_HUB_OFFLINE"] == "1" and huggingface_hub.constants.HF_HUB_OFFLINE is True


@pytest.mark.skipif(not os.path.isfile("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
def test_the_model_weights_are_memory_mapped_from_its_safetensors_file(tiny_model_dir):
    """transformers' from_pretrained on a local folder maps model.safetensors: a respawned process pages the weights
    in from the page cache instead of reading and copying them (nothing of the model is kept in the set-up cache)."""
    from fedbpt.core.models.scorer import load_model

    _, model = load_model(tiny_model_dir, "cpu")
    weights = os.path.realpath(os.path.join(tiny_model_dir, "model.safetensors"))
    spans = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and os.path.realpath(fields[5]) == weights:
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                spans.append((lo, hi))
    layer = next(p for n, p in model.named_parameters() if "encoder.layer.0" in n and n.endswith("weight"))
    assert any(lo <= layer.data_ptr() < hi for lo, hi in spans)
