"""Base model fingerprints: one per set of weights, computed once and cached next to the base, torch-free to read."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from glmtune import storage
from glmtune.errors import InvalidInputError
from glmtune.fingerprint import (
    FINGERPRINT_FILE,
    base_fingerprint,
    check_base_match,
    read_cached_fingerprint,
)


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny v2 models of identical shapes but different random weights (seed 0 and 1)."""
    from glmtune.modeling import create_model_dir

    root = tmp_path_factory.mktemp("bases")
    return {seed: create_model_dir("v2", "tiny", root / seed, seed=int(seed)) for seed in ("0", "1")}


def _copy(base: Path, target: Path) -> Path:
    return Path(shutil.copytree(base, target, ignore=shutil.ignore_patterns(FINGERPRINT_FILE)))


def test_same_weights_give_the_same_fingerprint_and_other_weights_another(bases, tmp_path):
    first = base_fingerprint(bases["0"])
    assert len(first) == 64 and first == base_fingerprint(_copy(bases["0"], tmp_path / "copy"))
    assert base_fingerprint(bases["1"]) != first


def test_the_fingerprint_covers_the_config_but_not_who_saved_it(bases, tmp_path):
    base = _copy(bases["0"], tmp_path / "m")
    before = base_fingerprint(base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "transformers_version": "9.9.9", "_name_or_path": "/x"}))
    assert base_fingerprint(base) == before
    (base / "config.json").write_text(json.dumps({**config, "seq_length": config["seq_length"] * 2}))
    assert base_fingerprint(base) != before


def test_the_fingerprint_is_cached_and_reused_while_sizes_and_mtimes_are_unchanged(bases, tmp_path):
    base = _copy(bases["0"], tmp_path / "m")
    fingerprint = base_fingerprint(base)
    cached = json.loads((base / FINGERPRINT_FILE).read_text())
    assert read_cached_fingerprint(cached) == fingerprint and set(cached["files"]) == {"config.json",
                                                                                     "model.safetensors"}
    # Flip one weight byte but keep size and mtime: the cache answers, so nothing was read again.
    weights = base / "model.safetensors"
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert base_fingerprint(base) == fingerprint
    # A new mtime invalidates the cache: the changed weights give a new fingerprint, cached in turn.
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    changed = base_fingerprint(base)
    assert changed != fingerprint
    assert read_cached_fingerprint((base / FINGERPRINT_FILE).read_text()) == changed


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_base_still_gives_its_fingerprint(bases, tmp_path):
    base = _copy(bases["0"], tmp_path / "m")
    base.chmod(0o555)
    try:
        assert base_fingerprint(base) == base_fingerprint(bases["0"])
        assert not (base / FINGERPRINT_FILE).exists()
    finally:
        base.chmod(0o755)


def test_a_cache_file_pinned_by_a_manifest_is_never_rewritten(bases, tmp_path):
    base = _copy(bases["0"], tmp_path / "m")
    base_fingerprint(base)
    storage.write_manifest(base)  # the cache file is now part of the checksummed copy
    later = tmp_path / "later"
    shutil.copytree(base, later)  # copied without its mtimes' meaning: the cache entries no longer match
    for path in later.iterdir():
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000_000))
    assert base_fingerprint(later) == base_fingerprint(bases["0"])
    storage.verify_manifest(later)


def test_pytorch_bin_weights_are_fingerprinted_too(bases, tmp_path):
    import torch
    from safetensors.torch import load_file

    base = _copy(bases["0"], tmp_path / "bin")
    torch.save(load_file(str(base / "model.safetensors")), base / "pytorch_model.bin")
    (base / "model.safetensors").unlink()
    fingerprint = base_fingerprint(base)
    assert fingerprint != base_fingerprint(bases["0"])  # other bytes, but a stable answer
    assert fingerprint == base_fingerprint(_copy(base, tmp_path / "bin2"))


def test_a_folder_without_weights_is_an_input_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InvalidInputError, match="no model"):
        base_fingerprint(tmp_path)


def test_cached_fingerprints_are_read_from_text_or_objects_and_junk_gives_none():
    good = {"format": 1, "fingerprint": "a" * 64, "files": {}}
    assert read_cached_fingerprint(json.dumps(good)) == "a" * 64
    assert read_cached_fingerprint(json.dumps(good).encode()) == "a" * 64
    assert read_cached_fingerprint(good) == "a" * 64
    for junk in ("not json", "[]", json.dumps({**good, "format": 2}), json.dumps({**good, "fingerprint": "xyz"})):
        assert read_cached_fingerprint(junk) is None


def test_a_mismatch_names_both_fingerprints_and_places_unless_allowed(caplog):
    export_fp, base_fp = "a" * 64, "b" * 64
    with pytest.raises(InvalidInputError) as failure:
        check_base_match(export_fp, base_fp, export_where="s3://b/export/glmtune-export.json",
                         base_where="/models/chatglm3-6b-base")
    message = str(failure.value)
    assert export_fp in message and base_fp in message
    assert "s3://b/export/glmtune-export.json" in message and "/models/chatglm3-6b-base" in message
    assert check_base_match(export_fp, base_fp, export_where="e", base_where="b", allow_mismatch=True) is False
    assert base_fp in caplog.text
    assert check_base_match(export_fp, export_fp, export_where="e", base_where="b") is True
    assert check_base_match(None, base_fp, export_where="e", base_where="b") is False  # an old export: unchecked


def test_the_fingerprint_module_imports_without_torch():
    code = "import sys, glmtune.fingerprint, glmtune.export_inspect; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
