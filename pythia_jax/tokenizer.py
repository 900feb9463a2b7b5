"""The GPT-NeoX-20B tokenizer (byte-level BPE, 50,277 ids; `<|endoftext|>` = 0, `<|padding|>` = 1).

`load_tokenizer()` with no argument uses the copy shipped in the package (works offline). A path
may be a `tokenizer.json`, a directory holding one (an HF export), or an HF hub id.
"""

from __future__ import annotations

import os
from importlib import resources

from tokenizers import Tokenizer

__all__ = ["load_tokenizer", "bundled_tokenizer_path", "EOD_ID", "PAD_ID"]

EOD_ID = 0
PAD_ID = 1


def bundled_tokenizer_path() -> str:
    return str(resources.files("pythia_jax") / "assets" / "20B_tokenizer.json")


def load_tokenizer(src: str | os.PathLike | None = None, revision: str | None = None) -> Tokenizer:
    if src is None:
        return Tokenizer.from_file(bundled_tokenizer_path())
    src = os.fspath(src)
    if os.path.isfile(src):
        try:
            return Tokenizer.from_file(src)
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"{src}: not a valid tokenizer.json ({e})") from None
    if os.path.isdir(src):
        path = os.path.join(src, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{src}: no tokenizer.json in this directory")
        return load_tokenizer(path)
    if os.path.exists(src) or src.startswith((".", "/")) or src.count("/") != 1:
        raise FileNotFoundError(f"{src}: no such tokenizer file or directory")
    from huggingface_hub import hf_hub_download
    try:
        path = hf_hub_download(src, "tokenizer.json", revision=revision)
    except Exception as e:
        raise OSError(f"could not download tokenizer.json of {src!r} from the HF hub "
                      f"(offline? set HF_HUB_OFFLINE=1 and pass a local path): {e}") from None
    return Tokenizer.from_file(path)
