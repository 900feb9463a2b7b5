"""End-to-end: scripts/preprocess_data.py, batch_viewer.py, unshard.py run as subprocesses."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import zstandard

from pythia_jax.data.indexed import MMapIndexedDataset, write_indexed_dataset
from pythia_jax.data.shards import shard
from pythia_jax.tokenizer import load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, os.path.join("scripts", script), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


def test_preprocess_cli_workers_zst_txt(tmp_path, shared_data):
    lines = (shared_data / "eval_data" / "lambada_test.jsonl").read_text().splitlines()[:150]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        (json.dumps({"text": "compressed doc"}) + "\n").encode()))
    (tmp_path / "c.txt").write_text("A whole file.\nOne document.")
    inputs = ",".join(str(tmp_path / n) for n in ("a.jsonl", "b.jsonl.zst", "c.txt"))
    r = run("preprocess_data.py", f"--input={inputs}", "--json_keys=text",
            f"--output_prefix={tmp_path / 'out'}", "--append_eod", "--workers=2")
    assert r.returncode == 0, r.stderr
    assert "152 documents" in r.stdout and "uint16" in r.stdout
    assert "docs/s" in r.stderr and "tokens/s" in r.stderr  # the progress bar
    ds = MMapIndexedDataset(tmp_path / "out_text_document")
    tok = load_tokenizer()
    texts = [json.loads(x)["text"] for x in lines] + ["compressed doc",
                                                      "A whole file.\nOne document."]
    assert len(ds) == len(texts) == 152
    for i in (0, 77, 149, 150, 151):
        np.testing.assert_array_equal(ds[i], tok.encode(texts[i]).ids + [0])
    assert ds.num_tokens == sum(len(tok.encode(t).ids) + 1 for t in texts)


def test_preprocess_cli_bad_json_line(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n{"text": "oops}\n')
    r = run("preprocess_data.py", f"--input={tmp_path / 'a.jsonl'}",
            f"--output_prefix={tmp_path / 'out'}", "--append_eod", "--noprogress")
    assert r.returncode == 1
    assert f"{tmp_path / 'a.jsonl'}:2: malformed JSON" in r.stderr
    assert os.listdir(tmp_path) == ["a.jsonl"]


def test_batch_viewer_cli(tmp_path):
    B, L = 4, 6
    items = (np.arange(5 * B * (L + 1)) % 50000).reshape(5 * B, L + 1).astype(np.uint16)
    items[:, 0] = [12092, 13, 309, 717] * 5  # "Hello", ",", " I", " am" at row starts
    write_indexed_dataset(tmp_path / "document", items, vocab_size=50277)
    out = tmp_path / "indicies.npy"
    r = run("batch_viewer.py", f"--data={tmp_path / 'document'}", "--start_step=1",
            "--end_step=3", f"--out={out}", f"--batch_size={B}", f"--seq_len={L}", "--decode",
            "--decode_limit=2")
    assert r.returncode == 0, r.stderr
    got = np.load(out)
    assert got.shape == ((3 - 1 + 1) * B, L + 1) and got.dtype == np.uint16
    np.testing.assert_array_equal(got, items[B:4 * B])
    assert "=== step 1 row 0 (item 4) ===\nHello" in r.stdout
    assert "=== step 1 row 1 (item 5) ===\n," in r.stdout and "row 2" not in r.stdout
    # past the end: an error and no output file
    r = run("batch_viewer.py", f"--data={tmp_path / 'document'}", "--start_step=4",
            "--end_step=5", f"--out={tmp_path / 'x.npy'}", f"--batch_size={B}",
            f"--seq_len={L}")
    assert r.returncode == 1
    assert "step 5 is past the end: expected 0 <= step < 5" in r.stderr
    assert not (tmp_path / "x.npy").exists()
    assert sorted(os.listdir(tmp_path)) == ["document.bin", "document.idx", "indicies.npy"]


def test_unshard_cli(tmp_path):
    data = os.urandom(5000)
    (tmp_path / "document.bin").write_bytes(data)
    paths = shard(str(tmp_path / "document.bin"), shard_size=2000)
    (tmp_path / "document.bin").unlink()
    table = {os.path.basename(p): hashlib.sha256(open(p, "rb").read()).hexdigest()
             for p in paths}
    (tmp_path / "bad_hashes.txt").write_text(
        "".join(f"{n} {'0' * 64 if n.endswith('00001-of-00002.bin') else h}\n"
                for n, h in table.items()))
    r = run("unshard.py", f"--input={paths[0]}", f"--hashes={tmp_path / 'bad_hashes.txt'}")
    assert r.returncode == 1
    assert "document-00001-of-00002.bin: sha256 mismatch: expected " + "0" * 64 in r.stderr
    assert not (tmp_path / "document.bin").exists()
    (tmp_path / "hashes.txt").write_text("".join(f"{n} {h}\n" for n, h in table.items()))
    r = run("unshard.py", f"--input_file={paths[0]}", "--num_shards=3",
            f"--hashes={tmp_path / 'hashes.txt'}", f"--sha256={hashlib.sha256(data).hexdigest()}")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "document.bin").read_bytes() == data
    assert "all shard hashes verified" in r.stdout
    assert [n for n in os.listdir(tmp_path) if n.endswith(".tmp")] == []
