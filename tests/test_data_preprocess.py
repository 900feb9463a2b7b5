"""Tokenization into indexed datasets (library side; the CLI is in test_scripts_data.py)."""

import gzip
import json
import os

import numpy as np
import pytest
import zstandard

from pythia_jax.data.indexed import MMapIndexedDataset
from pythia_jax.data.preprocess import PreprocessError, tokenize_to_indexed
from pythia_jax.tokenizer import load_tokenizer

DOCS = ["Hello, I am", " Hello world\n\n    x", "", "The end."]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _jsonl(path, docs, key="text"):
    path.write_text("".join(json.dumps({key: d, "meta": {"i": i}}) + "\n"
                            for i, d in enumerate(docs)))
    return path


def test_jsonl_one_item_per_document_with_eod(tmp_path, tok):
    src = _jsonl(tmp_path / "a.jsonl", DOCS)
    out = tokenize_to_indexed(src, tmp_path / "out", append_eod=True)
    assert out == {"text": str(tmp_path / "out_text_document")}
    ds = MMapIndexedDataset(out["text"])
    assert ds.dtype == np.uint16 and len(ds) == ds.num_docs == 3  # the empty doc is skipped
    np.testing.assert_array_equal(ds[0], [12092, 13, 309, 717, 0])
    np.testing.assert_array_equal(ds[1], [24387, 1533, 535, 50274, 89, 0])
    np.testing.assert_array_equal(ds[2], tok.encode("The end.").ids + [0])
    np.testing.assert_array_equal(ds.doc_idx, [0, 1, 2, 3])
    # without EOD: the same ids, no trailing 0
    ds2 = MMapIndexedDataset(tokenize_to_indexed(src, tmp_path / "noeod",
                                                 append_eod=False)["text"])
    np.testing.assert_array_equal(ds2[0], [12092, 13, 309, 717])


def test_several_inputs_zst_gz_txt_and_keys(tmp_path, tok):
    a = _jsonl(tmp_path / "a.jsonl", DOCS[:2])
    raw = "".join(json.dumps({"text": t, "title": t.upper()}) + "\n"
                  for t in ["zst one", "zst two"])
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw.encode()))
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "gz doc", "title": "T"}) + "\n")
    b, c = tmp_path / "b.jsonl.zst", tmp_path / "c.jsonl.gz"
    out = tokenize_to_indexed([a, b, c], tmp_path / "m", tokenizer=None)
    ds = MMapIndexedDataset(out["text"])
    texts = DOCS[:2] + ["zst one", "zst two", "gz doc"]
    assert len(ds) == 5
    for i, t in enumerate(texts):
        np.testing.assert_array_equal(ds[i], tok.encode(t).ids + [0])
    # two keys -> two datasets, NeoX names
    out2 = tokenize_to_indexed([b, c], tmp_path / "k", json_keys=("text", "title"))
    assert set(out2) == {"text", "title"}
    t2 = MMapIndexedDataset(out2["title"])
    np.testing.assert_array_equal(t2[1], tok.encode("ZST TWO").ids + [0])
    assert os.path.isfile(tmp_path / "k_title_document.idx")
    # .txt = one document per file
    (tmp_path / "p.txt").write_text("line one\nline two\n")
    ds3 = MMapIndexedDataset(tokenize_to_indexed(tmp_path / "p.txt", tmp_path / "t")["text"])
    assert len(ds3) == 1
    np.testing.assert_array_equal(ds3[0], tok.encode("line one\nline two\n").ids + [0])


def test_shakespeare_corpus_excerpt_with_a_tokenizer_path(tmp_path, shared_data, tok):
    text = (shared_data / "corpus" / "tinyshakespeare.txt").read_text()[:20000]
    (tmp_path / "s.txt").write_text(text)
    out = tokenize_to_indexed(tmp_path / "s.txt", tmp_path / "s",
                              tokenizer=shared_data / "tokenizer" / "20B_tokenizer.json")
    ds = MMapIndexedDataset(out["text"])
    np.testing.assert_array_equal(ds[0], tok.encode(text).ids + [0])
    assert tok.decode(ds[0][:-1].tolist()) == text


@pytest.mark.parametrize("line, message", [
    ('{"text": "ok"', r"b\.jsonl:3: malformed JSON: Expecting ',' delimiter at column 14"),
    ('{"body": "x"}', r"b\.jsonl:3: missing key 'text' \(found keys \['body'\]\)"),
    ('["text"]', r"b\.jsonl:3: expected a JSON object, found list"),
    ('{"text": 5}', r"b\.jsonl:3: key 'text': expected a string, found int"),
])
def test_bad_line_names_file_and_line_and_leaves_nothing(tmp_path, line, message):
    good = _jsonl(tmp_path / "a.jsonl", ["first file"])
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "one"}\n\n' + line + "\n" + '{"text": "four"}\n')
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(PreprocessError, match=message):
        tokenize_to_indexed([good, bad], tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == before  # no outputs, no temporary files


def test_bad_inputs_fail_before_writing(tmp_path):
    with pytest.raises(PreprocessError, match=r"nope\.jsonl: no such input file"):
        tokenize_to_indexed(tmp_path / "nope.jsonl", tmp_path / "o")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(PreprocessError, match=r"x\.csv: unsupported input type"):
        tokenize_to_indexed(tmp_path / "x.csv", tmp_path / "o")
    (tmp_path / "z.jsonl.zst").write_bytes(b"not zstd at all")
    with pytest.raises(PreprocessError, match=r"z\.jsonl\.zst: cannot decompress"):
        tokenize_to_indexed(tmp_path / "z.jsonl.zst", tmp_path / "o")
    assert sorted(os.listdir(tmp_path)) == ["x.csv", "z.jsonl.zst"]
