from pythia_jax.tokenizer import bundled_tokenizer_path, load_tokenizer


def test_real_tokenizer_encodes_reference_vector(shared_data):
    tok = load_tokenizer(shared_data / "tokenizer" / "20B_tokenizer.json")
    assert tok.encode("Hello, I am").ids == [12092, 13, 309, 717]
    assert tok.encode(" Hello world\n\n    x").ids == [24387, 1533, 535, 50274, 89]
    assert tok.get_vocab_size() == 50277


def test_bundled_copy_is_the_shared_file(shared_data):
    a = open(bundled_tokenizer_path(), "rb").read()
    b = (shared_data / "tokenizer" / "20B_tokenizer.json").read_bytes()
    assert a == b
    assert load_tokenizer().token_to_id("<|endoftext|>") == 0
    assert load_tokenizer().token_to_id("<|padding|>") == 1


def test_bad_tokenizer_paths(tmp_path):
    import pytest
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        load_tokenizer(bad)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path.parent)
