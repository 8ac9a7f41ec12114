"""`ofs-scale prepare`: every input format round-trips into megatron-core's indexed dataset
(decode(document without its EOD) == text, EOD closing every document), the output equals what
megatron-core's own builder writes, interrupted and two-worker preparations give the same bytes as
one uninterrupted worker, malformed records are counted with file and line, and unreadable inputs
stop with their name."""

from __future__ import annotations

import gzip
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

from ofs_scale.data.prepare import DataError, prepare_dataset
from ofs_scale.data.prepare import run as run_mod
from ofs_scale.data.prepare.cli import main as prepare_main
from ofs_scale.data.prepare.tokenizer import load_tokenizer, train_tokenizer

WORDS = ["alpha", "beta", "déjà vu", "naïve", "日本語", "emoji 🙂", "x = 1\n", "  indent", "a\tb"]


def make_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)

    def word() -> str:
        if rng.random() < 0.3:
            return rng.choice(WORDS)
        return "".join(rng.choice("etaoinshrdlucmfwyp") for _ in range(rng.randint(1, 8)))

    return [
        " ".join(word() for _ in range(rng.randint(1, 30))) + rng.choice(["", "\n"])
        for _ in range(n)
    ]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    data = "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)).encode()
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    elif path.name.endswith(".zst"):
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def write_parquet(path: Path, texts: list, key: str = "text") -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({key: texts}), path, row_group_size=7)
    return path


def part_docs(out_dir: Path, prefix: str) -> list[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(out_dir / prefix))
    return [np.array(ds[i]) for i in range(len(ds))]  # copies: ds unmaps when collected


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    """A 400-piece tokenizer trained once for the module."""
    path = tmp_path_factory.mktemp("tok") / "tok.model"
    train_tokenizer(iter(make_texts(400, 0) * 3), 400, path)
    return path


def check_round_trip(out_dir: Path, manifest: dict, expected: dict[str, list[str]]) -> None:
    """Every part's documents decode to the texts of its sources, each ends with the EOD."""
    sp = load_tokenizer(out_dir / "tokenizer.model")
    eod = manifest["tokenizer"]["eod_id"]
    for part in manifest["parts"]:
        texts = [t for src in part["sources"] for t in expected[src]]
        docs = part_docs(out_dir, part["prefix"])
        assert part["documents"] == len(docs) == len(texts)
        assert part["tokens"] == sum(len(d) for d in docs)
        for doc, text in zip(docs, texts):
            assert doc[-1] == eod and eod not in doc[:-1].tolist()
            assert sp.decode(doc[:-1].tolist()) == text
    assert manifest["documents"] == sum(len(v) for v in expected.values())
    assert manifest["complete"] is True


def test_every_format_round_trips(tmp_path, tok):
    src = tmp_path / "src"
    (src / "jsonl").mkdir(parents=True)
    (src / "text").mkdir()
    expected: dict[str, list[str]] = {}
    for i, name in enumerate(["a.jsonl", "b.jsonl.gz", "c.jsonl.zst"]):
        expected[str(write_jsonl(src / "jsonl" / name, make_texts(20 + i, i)))] = make_texts(
            20 + i, i
        )
    parquet = write_parquet(src / "d.parquet", make_texts(30, 5))
    expected[str(parquet)] = make_texts(30, 5)
    for i, name in enumerate(["m.py", "n.txt"]):
        (src / "text" / name).write_text(make_texts(1, 10 + i)[0])
        expected[str(src / "text" / name)] = make_texts(1, 10 + i)
    single = src / "single.txt"
    single.write_text("one document\nof two lines\n")
    expected[str(single)] = ["one document\nof two lines\n"]
    inputs = [str(src / "jsonl"), str(src / "*.parquet"), str(src / "text"), str(single)]
    datasets = pytest.importorskip("datasets")
    hf = src / "hf"
    datasets.Dataset.from_dict({"text": make_texts(25, 7)}).save_to_disk(str(hf))
    arrows = sorted(str(p) for p in hf.glob("*.arrow"))
    expected[arrows[0]] = make_texts(25, 7)
    inputs.append(str(hf))
    out = tmp_path / "out"
    manifest = prepare_dataset(inputs, out, tokenizer_model=tok, progress=False)
    # one part per jsonl / parquet / arrow file; consecutive plain-text files share one
    assert [len(p["sources"]) for p in manifest["parts"]] == [1, 1, 1, 1, 3, 1]
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"]["vocab_size"] == 400
    assert json.loads((out / "manifest.json").read_text()) == manifest
    check_round_trip(out, manifest, expected)


def test_trained_tokenizer_and_idempotent_rerun(tmp_path):
    data = write_jsonl(tmp_path / "a.jsonl", make_texts(300, 1))
    out = tmp_path / "out"
    manifest = prepare_dataset([str(data)], out, vocab_size=400, sample_bytes=20_000)
    assert manifest["tokenizer"]["vocab_size"] == 400
    check_round_trip(out, manifest, {str(data): make_texts(300, 1)})
    stamp = (out / "manifest.json").stat().st_mtime_ns
    again = prepare_dataset([str(data)], out, vocab_size=400, sample_bytes=20_000)
    assert again == manifest and (out / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="400-piece vocabulary"):
        prepare_dataset([str(data)], out, vocab_size=512, progress=False)


def test_stdlib_input(tmp_path, tok, monkeypatch):
    from ofs_scale.data.prepare import sources

    few = sources._stdlib_files()[:5]
    monkeypatch.setattr(sources, "_stdlib_files", lambda: few)
    manifest = prepare_dataset(["stdlib"], tmp_path / "out", tokenizer_model=tok, progress=False)
    assert manifest["parts"][0]["sources"] == [str(p) for p in few]
    expected = {str(p): [p.read_text()] if p.read_text().strip() else [] for p in few}
    check_round_trip(tmp_path / "out", manifest, expected)


def test_same_bytes_as_megatron_builder(tmp_path, tok):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    texts = make_texts(40, 3)
    data = write_jsonl(tmp_path / "a.jsonl", texts)
    prepare_dataset([str(data)], tmp_path / "out", tokenizer_model=tok, progress=False)
    sp = load_tokenizer(tok)
    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for text in texts:
        ids = [*sp.encode(text), sp.eos_id()]
        builder.add_document(np.array(ids, dtype=np.uint16), [len(ids)])
    builder.finalize(str(tmp_path / "ref.idx"))
    for ext in ("bin", "idx"):
        ours = (tmp_path / "out" / f"part_00000.{ext}").read_bytes()
        assert ours == (tmp_path / f"ref.{ext}").read_bytes()


def assert_same_dataset(a: Path, b: Path) -> None:
    """Same files with the same bytes; the manifests differ only in the command line (--out)."""
    files = {p.name for p in a.iterdir()}
    assert files == {p.name for p in b.iterdir()}
    for name in files - {"manifest.json"}:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    assert ma.pop("created_by").replace(str(a), "OUT") == mb.pop("created_by").replace(
        str(b), "OUT"
    )
    assert ma == mb


@pytest.fixture
def shards(tmp_path) -> list[str]:
    return [str(write_jsonl(tmp_path / f"s{i}.jsonl", make_texts(30, 20 + i))) for i in range(5)]


def test_interrupted_preparation_resumes_to_same_bytes(tmp_path, tok, shards, monkeypatch):
    ref = prepare_dataset(shards, tmp_path / "ref", tokenizer_model=tok, progress=False)
    out = tmp_path / "out"
    real, calls = run_mod.write_part, []

    def dies_in_third_part(out_dir, index, *args, **kw):
        calls.append(index)
        if len(calls) == 3:  # a killed part leaves its temporary files behind
            (out_dir / f".part_{index:05d}.tmp.bin").write_bytes(b"half")
            raise KeyboardInterrupt
        return real(out_dir, index, *args, **kw)

    monkeypatch.setattr(run_mod, "write_part", dies_in_third_part)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(shards, out, tokenizer_model=tok, progress=False)
    partial = json.loads((out / "manifest.json").read_text())
    assert [p["prefix"] for p in partial["parts"]] == ["part_00000", "part_00001"]
    assert partial["complete"] is False
    monkeypatch.setattr(run_mod, "write_part", real)
    calls.clear()
    again = prepare_dataset(shards, out, tokenizer_model=tok, progress=False)
    assert again["parts"] == ref["parts"]
    assert_same_dataset(out, tmp_path / "ref")


def test_two_workers_write_the_same_bytes(tmp_path, tok, shards):
    one = prepare_dataset(shards, tmp_path / "one", tokenizer_model=tok, progress=False)
    two = prepare_dataset(shards, tmp_path / "two", tokenizer_model=tok, workers=2, progress=False)
    assert one["parts"] == two["parts"] and one["complete"] and two["complete"]
    assert_same_dataset(tmp_path / "one", tmp_path / "two")


def test_malformed_records_are_skipped_and_counted(tmp_path, tok):
    good = make_texts(4, 9)
    lines = [json.dumps({"text": good[0]}).encode(), b"{not json", json.dumps({"text": 7}).encode()]
    lines += [b'{"text": "caf\xe9"}', json.dumps({"body": "x"}).encode()]
    lines += [json.dumps({"text": t}).encode() for t in good[1:]]
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\n".join(lines) + b"\n")
    pq_path = write_parquet(tmp_path / "p.parquet", [good[0], None, good[1]])
    manifest = prepare_dataset([str(bad), str(pq_path)], tmp_path / "out", tokenizer_model=tok)
    jl, pq = manifest["parts"]
    assert (jl["documents"], jl["skipped"], pq["documents"], pq["skipped"]) == (4, 4, 2, 1)
    assert jl["bad_records"][0].startswith(f"{bad}:2: not a JSON line")
    assert [r.split(": ")[0] for r in jl["bad_records"]] == [f"{bad}:{i}" for i in (2, 3, 4, 5)]
    assert "not UTF-8" in jl["bad_records"][2] and "row 2" in pq["bad_records"][0]
    check_round_trip(tmp_path / "out", manifest, {str(bad): good, str(pq_path): [good[0], good[1]]})
    useless = write_jsonl(tmp_path / "useless.jsonl", [])
    useless.write_text('{"body": "x"}\n{"text": ""}\n')
    with pytest.raises(DataError, match=r"no usable document \(1 malformed, 1 empty; first: .*:1:"):
        prepare_dataset([str(useless)], tmp_path / "out2", tokenizer_model=tok, progress=False)


@pytest.mark.parametrize("case", ["gz", "zst", "parquet", "column", "missing", "glob"])
def test_unreadable_input_stops_with_its_name(tmp_path, tok, case):
    path = tmp_path / {"gz": "x.jsonl.gz", "zst": "x.jsonl.zst", "parquet": "x.parquet"}.get(
        case, "x.parquet"
    )
    if case in ("gz", "zst"):
        good = write_jsonl(path, make_texts(200, 1)).read_bytes()
        path.write_bytes(good[: len(good) // 2] + b"\0garbage" * 8)
    elif case == "parquet":
        path.write_bytes(b"PAR1 this is not parquet PAR1")
    elif case == "column":
        write_parquet(path, ["a", "b"], key="content")
    spec = {"missing": str(tmp_path / "nope.jsonl"), "glob": str(tmp_path / "*.none")}
    spec = spec.get(case, str(path))
    other = write_jsonl(tmp_path / "ok.jsonl", make_texts(5, 2))
    with pytest.raises(DataError) as err:
        workers = 2 if case == "gz" else 1  # the error crosses the process boundary too
        prepare_dataset([str(other), spec], tmp_path / "out", tokenizer_model=tok, workers=workers)
    message = str(err.value)
    assert (Path(spec).name if case != "glob" else spec) in message
    fixes = {"column": "--text-key", "missing": "does not exist", "glob": "matches no file"}
    assert fixes.get(case, "corrupt or truncated") in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files without read permission")
def test_unreadable_permission(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", ["x"])
    path.chmod(0)
    with pytest.raises(DataError, match="chmod"):
        prepare_dataset([str(path)], tmp_path / "out", tokenizer_model=tok, progress=False)


def test_vocabulary_advice_respects_the_minimum(tmp_path):
    data = write_jsonl(tmp_path / "a.jsonl", ["tiny corpus"] * 3)
    with pytest.raises(DataError) as err:
        prepare_dataset([str(data)], tmp_path / "out", vocab_size=5000, progress=False)
    numbers = [int(w) for w in str(err.value).replace(",", " ").split() if w.isdigit()]
    assert "give more text" in str(err.value) and all(n >= 320 for n in numbers if n != 5000)
    with pytest.raises(DataError, match="at least 320"):
        prepare_dataset([str(data)], tmp_path / "out2", vocab_size=300, progress=False)


def test_cli_help_and_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        prepare_main(["--help"])
    assert done.value.code == 0 and "--tokenizer" in capsys.readouterr().out
    assert prepare_main([str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().out
