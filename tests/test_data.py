"""Data: prepared indexed datasets, the small-corpus path, blends, the sampler's guarantees and the
named errors for missing or mismatched datasets."""

import json

import numpy as np
import pytest

from ofs_scale.config import ConfigError, load_config
from ofs_scale.data import BatchSampler, DataError, collate, open_data
from ofs_scale.data.blend import blend, feistel_permute
from ofs_scale.data.corpus import list_files, stdlib_root
from ofs_scale.data.indexed import open_prepared
from ofs_scale.data.sampler import eval_micro_batches
from ofs_scale.data.small import prepare_corpus
from tests.helpers import random_docs, write_indexed_dataset


def _data(*over: str):
    return load_config(None, ["data.seq_len=16", "data.vocab_size=512", *over]).data


def _spec(*paths_weights) -> str:
    items = ", ".join(f"{{path: {p}, weight: {w}}}" for p, w in paths_weights)
    return f"data.datasets=[{items}]"


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    a = write_indexed_dataset(root / "a", random_docs(300, 512, 0, mark=7), 512)
    b = write_indexed_dataset(root / "b", random_docs(100, 512, 1, mark=9), 512)
    return a, b


def test_stdlib_corpus_is_deterministic(tmp_path):
    a = list_files("stdlib", max_files=20)
    assert a == list_files("stdlib", max_files=20) and len(a) == 20
    root = stdlib_root()
    assert root.is_dir() and all(p.relative_to(root).parts[0] != "test" for p in a)
    with pytest.raises(DataError, match="neither 'stdlib'"):
        list_files(str(tmp_path / "nope"))


def test_corpus_is_prepared_once_into_the_indexed_format(tiny_corpus, tmp_path):
    d = _data(f"data.corpus={tiny_corpus}", f"data.cache_dir={tmp_path}", "data.val_fraction=0.2")
    path = prepare_corpus(d.corpus, 512, d.cache_dir, progress=False)
    mtime = (path / "manifest.json").stat().st_mtime_ns
    assert prepare_corpus(d.corpus, 512, d.cache_dir, progress=False) == path
    assert (path / "manifest.json").stat().st_mtime_ns == mtime  # not prepared again
    ds = open_prepared(path)
    assert ds.tokenizer["vocab_size"] == 512 and ds.num_tokens == ds.manifest["tokens"]
    data = open_data(d, rank=0, seed=0, progress=False)
    assert data.train.num_samples > 50 and data.val.num_samples > 0
    x, y = collate(data.train, np.arange(4))
    assert x.shape == (4, 16) and int(x.max()) < 512 and bool((x[:, 1:] == y[:, :-1]).all())
    # a changed corpus (file list, sizes, mtimes) gets a new cache entry
    (tiny_corpus / "extra.py").write_text("x = 1\n" * 50)
    try:
        assert prepare_corpus(d.corpus, 512, d.cache_dir, progress=False) != path
    finally:
        (tiny_corpus / "extra.py").unlink()


def test_megatron_dataset_windows_are_the_token_stream(tmp_path):
    docs = random_docs(40, 512, 3)
    path = write_indexed_dataset(tmp_path / "m", docs, 512)
    ds = open_prepared(path)
    halves = [docs[:20], docs[20:]]
    for stream, half in zip(ds.streams, halves):
        want = np.concatenate([np.array(d) for d in half])
        np.testing.assert_array_equal(stream.read(0, len(stream)), want)
    data = open_data(_data(_spec((path, 1)), "data.val_fraction=0.1"), 0, seed=0)
    first, count = data.train.parts[0].first, data.train.parts[0].count
    windows = data.train.windows(np.arange(count))  # one epoch: every training window once
    expect = [data.train.parts[0].read(w) for w in range(first, first + count)]
    assert sorted(map(bytes, windows.astype(np.int64))) == sorted(map(bytes, expect))


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 1025])
def test_feistel_permutation_is_a_bijection(n):
    keys = np.random.SeedSequence([0, 0, 0]).generate_state(4, np.uint64)
    perm = feistel_permute(np.arange(n), n, keys)
    assert sorted(perm.tolist()) == list(range(n))
    if n >= 64:  # shuffled, and another key shuffles differently
        other = feistel_permute(np.arange(n), n, keys + np.uint64(1))
        assert (perm != np.arange(n)).mean() > 0.9 and (perm != other).mean() > 0.9


def test_blend_draws_in_proportion_to_weights():
    weights = [0.5, 0.3, 0.15, 0.05]
    which, draw = blend(np.arange(100_000), weights)
    for i, w in enumerate(weights):
        counts = np.cumsum(which == i)
        # every prefix of the stream holds its share to within a couple of samples
        assert np.abs(counts - w * np.arange(1, 100_001)).max() <= 3
        np.testing.assert_array_equal(draw[which == i], np.arange((which == i).sum()))
    # index by index: any slice gives what the whole computation gave
    part = blend(np.arange(5_000, 5_100), weights)
    np.testing.assert_array_equal(part[0], which[5_000:5_100])
    np.testing.assert_array_equal(part[1], draw[5_000:5_100])


def test_blended_windows_follow_weights(two_datasets):
    a, b = two_datasets
    data = open_data(_data(_spec((a, 0.25), (b, 0.75))), 0, seed=5)
    x, _ = collate(data.train, np.arange(2_000))  # the small dataset repeats (several epochs)
    from_a = (x[:, 0] == 7).float().mean().item()  # a window may start on an EOD (1)
    from_b = (x[:, 0] == 9).float().mean().item()
    assert abs(from_a / (from_a + from_b) - 0.25) < 0.03


def test_sampler_same_batches_under_any_dp_and_resume(two_datasets):
    a, b = two_datasets
    data = open_data(_data(_spec((a, 1), (b, 2))), 0, seed=3)
    gb, mb = 8, 2
    ranks = [BatchSampler(gb, mb, r, 2, data.train.key) for r in range(2)]
    single = BatchSampler(gb, 1, 0, 1, data.train.key)
    for _ in range(30):
        parts = [np.concatenate(s.next()) for s in ranks]
        whole = np.concatenate(single.next())
        np.testing.assert_array_equal(np.concatenate(parts), whole)
        rows = np.concatenate([collate(data.train, p)[0].numpy() for p in parts])
        np.testing.assert_array_equal(rows, collate(data.train, whole)[0].numpy())
    resumed = BatchSampler(gb, mb, 1, 2, data.train.key)
    resumed.load_state_dict(ranks[1].state_dict())
    for _ in range(5):
        np.testing.assert_array_equal(
            np.concatenate(resumed.next()), np.concatenate(ranks[1].next())
        )
    other = open_data(_data(_spec((a, 1), (b, 1))), 0, seed=3).train.key
    with pytest.raises(DataError, match="sampler was for other data"):
        BatchSampler(gb, mb, 0, 1, other).load_state_dict(single.state_dict())


def test_eval_set_is_layout_independent():
    one = np.concatenate(eval_micro_batches(50, 2, 8, 2, 0, 1))
    two = [np.concatenate(eval_micro_batches(50, 2, 8, 2, r, 2)) for r in range(2)]
    assert sorted(one.tolist()) == sorted(np.concatenate(two).tolist())


def test_tokenizer_or_vocab_mismatch_is_refused(two_datasets, tmp_path):
    a, _ = two_datasets
    other = write_indexed_dataset(tmp_path / "o", random_docs(20, 512, 2), 512, tokenizer=b"x")
    with pytest.raises(DataError, match=r"was made by tokenizer sha256 .*--tokenizer "):
        open_data(_data(_spec((a, 1), (other, 1))), 0, seed=0)
    with pytest.raises(DataError, match=r"a 512-piece vocabulary.*data.vocab_size=1024"):
        open_data(_data(_spec((a, 1)), "data.vocab_size=1024"), 0, seed=0)
    model = tmp_path / "run.model"
    model.write_bytes(b"x")
    with pytest.raises(DataError, match=f"data.tokenizer={model}"):
        open_data(_data(_spec((a, 1)), f"data.tokenizer={model}"), 0, seed=0)
    open_data(_data(_spec((other, 1)), f"data.tokenizer={model}"), 0, seed=0)  # the same: fine


def test_missing_or_broken_dataset_is_named(two_datasets, tmp_path, capsys):
    from ofs_scale.trainer.main import main

    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=f"prepared dataset {missing} does not exist"):
        open_data(_data(_spec((missing, 1))), 0, seed=0)
    assert main(["--dry-run", "data.vocab_size=512", _spec((missing, 1))]) == 2
    assert f"prepared dataset {missing} does not exist" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"has no manifest\.json"):
        open_data(_data(_spec((tmp_path / "empty", 1))), 0, seed=0)
    broken = write_indexed_dataset(tmp_path / "b", random_docs(20, 512, 4), 512)
    with open(broken / "part_00001.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match=r"part_00001.bin holds 10 bytes.*truncated"):
        open_data(_data(_spec((broken, 1))), 0, seed=0)
    (broken / "part_00001.idx").unlink()
    with pytest.raises(DataError, match=r"part_00001.idx is missing"):
        open_data(_data(_spec((broken, 1))), 0, seed=0)
    manifest = json.loads((two_datasets[0] / "manifest.json").read_text())
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished/manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(DataError, match="preparation unfinished"):
        open_data(_data(_spec((tmp_path / "unfinished", 1))), 0, seed=0)


def test_datasets_config_is_checked():
    with pytest.raises(ConfigError, match=r"data.datasets.0.weight=0.0 must be positive"):
        _data(_spec(("/x", 0)))
    with pytest.raises(ConfigError, match=r"data.datasets.1.path is empty"):
        _data("data.datasets=[{path: /x}, {weight: 2}]")
    with pytest.raises(ConfigError, match=r"unknown config key 'data.datasets.0.wieght'"):
        _data("data.datasets=[{path: /x, wieght: 2}]")
    with pytest.raises(ConfigError, match=r"parallel.timeout_min=0.0 must be positive"):
        load_config(None, ["parallel.timeout_min=0"])
