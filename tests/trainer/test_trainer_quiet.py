"""A plain `glmtune train` prints only its own lines: no third-party warnings, no bitsandbytes notices."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import spec_mapping

NOISE = re.compile(r"warn|deprecat|bitsandbytes|kernels-community|traceback", re.IGNORECASE)
# Runs `glmtune train` and then reports whether bitsandbytes was ever imported (stdout, last line).
TRAIN_AND_REPORT = ("import sys\nfrom glmtune_app.cli import main\ncode = main(sys.argv[1:])\n"
                    "print('bitsandbytes imported:', 'bitsandbytes' in sys.modules)\nsys.exit(code)\n")


@pytest.mark.slow  # a fresh interpreter (~20 s of imports on 2 cores), as a user's shell starts it
@pytest.mark.parametrize(("method", "bitsandbytes_imported"), [("lora", True), ("full", False)])
def test_train_prints_no_third_party_warnings(tiny_model, tmp_path: Path, method: str,
                                              bitsandbytes_imported: bool) -> None:
    mapping = spec_mapping(tiny_model("v2"), tmp_path / "export", method, maxSteps=2, gradientCheckpointing=True)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(mapping, allow_unicode=True), encoding="utf-8")
    done = subprocess.run([sys.executable, "-c", TRAIN_AND_REPORT, "train", str(spec_file), "--workdir",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [line for line in done.stderr.splitlines() if NOISE.search(line)] == []
    checkpoint, exported = done.stderr.splitlines()[-2:]
    assert checkpoint == f"checkpoint: {tmp_path / 'run' / 'checkpoints' / 'step-00000002'}"
    assert exported.startswith("exported (") and exported.endswith(str(tmp_path / "export"))
    # peft imports bitsandbytes itself for LoRA; a full fine-tune has no reason to load it at all.
    assert done.stdout.splitlines()[-1] == f"bitsandbytes imported: {bitsandbytes_imported}"
