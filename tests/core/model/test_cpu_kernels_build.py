"""Building glmtune's CPU kernels: cached per source/torch/compiler, built once under concurrency, and every way it
can fail (no compiler, a compile error, another CPU architecture) falls back to torch's kernels with one warning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from glmtune.kernels import build

REPO = Path(__file__).resolve().parents[3]

# A decode step of an int4 layer in a fresh process; prints the ops it ran, its output, torch's output with the
# kernels off, and the warnings logged.
PROBE = textwrap.dedent("""
    import json, logging, os, torch
    from torch import nn
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append((record.levelname, record.name, record.getMessage()))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    from glmtune.modeling.quantization import QuantizedLinear
    torch.manual_seed(0)
    layer = QuantizedLinear.from_linear(nn.Linear(256, 32), 4)
    x = torch.randn(1, 256)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = layer(x)
        layer(x)
    os.environ["GLMTUNE_CPU_KERNELS"] = "0"
    with torch.no_grad():
        reference = layer(x)
    print(json.dumps({"ops": sorted({e.name for e in prof.events()}), "equal_to_torch": torch.equal(out, reference),
                      "records": records}))
""")


def probe(cache: Path, **env: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "GLMTUNE_KERNEL_CACHE": str(cache), "GLMTUNE_CPU_KERNELS": "1", **env})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def fallback_warnings(result: dict) -> list[str]:
    return [message for level, name, message in result["records"]
            if level == "WARNING" and name == "glmtune.kernels" and "not used" in message]


def test_without_a_compiler_the_layer_runs_torchs_kernel_after_one_warning(tmp_path):
    result = probe(tmp_path / "cache", CXX="/nonexistent/c++")
    assert "glmtune::int4_linear" not in result["ops"] and "aten::_weight_int4pack_mm_for_cpu" in result["ops"]
    assert result["equal_to_torch"]
    assert fallback_warnings(result) == [
        "glmtune CPU kernels not used: no C++ compiler: '/nonexistent/c++' not found (set CXX); "
        "running torch's kernels instead"]


def test_a_failing_compile_is_reported_with_its_error_and_log(tmp_path):
    compiler = tmp_path / "broken-c++"
    compiler.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'broken 1.0'; exit 0; fi\n"
                        "echo 'kernels.h:1: error: this compiler is broken' >&2; exit 1\n")
    compiler.chmod(0o755)
    result = probe(tmp_path / "cache", CXX=str(compiler))
    assert result["equal_to_torch"] and "glmtune::int4_linear" not in result["ops"]
    [warning] = fallback_warnings(result)
    assert "exited with 1: kernels.h:1: error: this compiler is broken" in warning
    log = Path(warning.split("full log: ")[1].split(")")[0])
    assert "this compiler is broken" in log.read_text()
    assert not list(log.parent.glob("*.so"))


def test_other_architectures_are_refused_before_compiling(monkeypatch, tmp_path):
    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(build.platform, "machine", lambda: "aarch64")
    with pytest.raises(build.BuildError, match="x86-64 only"):
        build.library_path()
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_concurrent_processes_build_once_and_later_ones_reuse_the_cache(tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "GLMTUNE_KERNEL_CACHE": str(cache), "GLMTUNE_CPU_KERNELS": "1"}
    runs = [subprocess.Popen([sys.executable, "-c", PROBE], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=REPO, env=env) for _ in range(2)]
    results = []
    for run in runs:
        stdout, stderr = run.communicate(timeout=600)
        assert run.returncode == 0, stderr
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    results.append(probe(cache))
    compiled = [sum("compiled glmtune CPU kernels" in message for _, _, message in r["records"]) for r in results]
    assert sorted(compiled) == [0, 0, 1]
    assert all("glmtune::int4_linear" in r["ops"] and not fallback_warnings(r) for r in results)
    [folder] = cache.iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["build.lock", "build.log", build.LIBRARY_NAME]


@pytest.mark.slow  # compiles in a fresh cache
def test_a_prebuilt_library_runs_without_a_compiler(tmp_path):
    built = probe(tmp_path / "cache")  # builds (or reuses) the library in a fresh cache
    assert "glmtune::int4_linear" in built["ops"]
    [library] = (tmp_path / "cache").glob(f"*/{build.LIBRARY_NAME}")
    shipped = tmp_path / "image" / build.LIBRARY_NAME
    shipped.parent.mkdir()
    shipped.write_bytes(library.read_bytes())
    result = probe(tmp_path / "empty", CXX="/nonexistent/c++", GLMTUNE_KERNEL_LIBRARY=str(shipped))
    assert "glmtune::int4_linear" in result["ops"] and not fallback_warnings(result)
    assert not (tmp_path / "empty").exists()


def test_a_missing_prebuilt_library_is_named_in_the_warning(tmp_path):
    result = probe(tmp_path / "cache", GLMTUNE_KERNEL_LIBRARY=str(tmp_path / "nope.so"))
    assert result["equal_to_torch"] and "glmtune::int4_linear" not in result["ops"]
    [warning] = fallback_warnings(result)
    assert f"GLMTUNE_KERNEL_LIBRARY='{tmp_path / 'nope.so'}' is not a file" in warning
