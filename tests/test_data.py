import numpy as np
import pytest

from ofs_scale.data import BatchSampler, DataError, open_data, prepare_data, read_corpus
from ofs_scale.data.corpus import stdlib_root
from ofs_scale.data.sampler import eval_micro_batches


def test_stdlib_corpus_is_deterministic():
    a = read_corpus("stdlib", max_files=20)
    b = read_corpus("stdlib", max_files=20)
    assert [n for n, _ in a.docs] == [n for n, _ in b.docs]
    assert all(not n.startswith("test/") for n, _ in a.docs)
    assert stdlib_root().is_dir()


def test_tokenizer_and_shards_are_cached(tiny_corpus, tmp_path):
    p1 = prepare_data(str(tiny_corpus), 512, tmp_path, val_fraction=0.2, show_progress=False)
    mtime = p1.tokenizer_path.stat().st_mtime_ns
    p2 = prepare_data(str(tiny_corpus), 512, tmp_path, val_fraction=0.2, show_progress=False)
    assert p2.tokenizer_path == p1.tokenizer_path and p2.data_dir == p1.data_dir
    assert p2.tokenizer_path.stat().st_mtime_ns == mtime  # not retrained
    train, val = open_data(p1, 16)
    assert train.num_samples > 50 and val.num_samples > 0
    w = train.window(3)
    assert w.shape == (17,) and w.max() < 512
    # a changed corpus gets a new cache entry
    (tiny_corpus / "extra.py").write_text("x = 1\n" * 50)
    try:
        p3 = prepare_data(str(tiny_corpus), 512, tmp_path, val_fraction=0.2, show_progress=False)
        assert p3.tokenizer_path != p1.tokenizer_path
    finally:
        (tiny_corpus / "extra.py").unlink()


def test_bad_inputs_are_counted_or_reported(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "ok.txt").write_text("hello world\n" * 10)
    (d / "empty.txt").write_text("")
    (d / "latin.txt").write_bytes(b"caf\xe9\n")
    corpus = read_corpus(str(d))
    assert len(corpus.docs) == 1
    assert corpus.skipped == {"empty": 1, "not utf-8": 1}
    with pytest.raises(DataError, match="no usable text"):
        read_corpus(str(tmp_path / "c" / "empty.txt"))
    with pytest.raises(DataError, match="neither 'stdlib'"):
        read_corpus(str(tmp_path / "nope"))
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(DataError, match=r"x.jsonl:2: each JSON line needs a string field 'text'"):
        read_corpus(str(bad))
    good = tmp_path / "y.jsonl"
    good.write_text('{"text": "alpha beta"}\n\n{"text": "gamma"}\n')
    assert [t for _, t in read_corpus(str(good)).docs] == ["alpha beta", "gamma"]


def test_sampler_disjoint_ranks_and_resume():
    n, gb, mb = 100, 8, 2
    ranks = [BatchSampler(n, gb, mb, r, 2, seed=3) for r in range(2)]
    single = BatchSampler(n, gb, mb, 0, 1, seed=3)
    for _ in range(30):  # crosses epochs (12 batches per epoch)
        parts = [np.concatenate(s.next()) for s in ranks]
        assert not set(parts[0]) & set(parts[1])
        np.testing.assert_array_equal(np.concatenate(parts), np.concatenate(single.next()))
    resumed = BatchSampler(n, gb, mb, 1, 2, seed=3)
    resumed.load_state_dict(ranks[1].state_dict())
    fresh = ranks[1]
    for _ in range(5):
        np.testing.assert_array_equal(np.concatenate(resumed.next()), np.concatenate(fresh.next()))
    with pytest.raises(DataError, match=r"data or data\.seq_len changed"):
        BatchSampler(99, gb, mb, 0, 1, seed=3).load_state_dict(single.state_dict())


def test_eval_set_is_layout_independent():
    one = np.concatenate(eval_micro_batches(50, 2, 8, 2, 0, 1))
    two = [np.concatenate(eval_micro_batches(50, 2, 8, 2, r, 2)) for r in range(2)]
    assert sorted(one.tolist()) == sorted(np.concatenate(two).tolist())
