"""An adapter or prefix export refuses a base other than the one it was trained over (by fingerprint), in
`glmtune.load_model`, in serving (`--adapter`) and on the command line; experts can override."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from glmtune_inference.loading import LoadOptions, load_served_models

import glmtune
from glmtune import storage
from glmtune.errors import InvalidInputError
from glmtune.export_loading import load_export
from glmtune.fingerprint import FINGERPRINT_FILE, base_fingerprint


@pytest.fixture(scope="module")
def other_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny v2 model with the shapes of the exports' base but other weights (what chatglm3-6b-base is to
    chatglm3-6b): everything loads over it without error, which is why the fingerprint must refuse it."""
    from glmtune.modeling import create_model_dir

    return create_model_dir("v2", "tiny", tmp_path_factory.mktemp("other") / "m", seed=1)


def fingerprinted(export: Path, target: Path, trained_over: Path, base_model: Path | str) -> Path:
    """A copy of `export` recording the fingerprint of `trained_over` and naming `base_model` as its base."""
    copy = Path(shutil.copytree(export, target))
    info = json.loads((copy / "glmtune-export.json").read_text())
    info.update(base_fingerprint=base_fingerprint(trained_over), base_model=str(base_model))
    (copy / "glmtune-export.json").write_text(json.dumps(info))
    storage.write_manifest(copy)
    return copy


@pytest.mark.parametrize("kind", ["adapter", "prefix"])
def test_load_model_refuses_a_delta_over_another_base_naming_both(exports, other_base, tmp_path, kind):
    base = exports.get("base", "v2")
    export = fingerprinted(exports.get(kind, "v2"), tmp_path / kind, base, other_base)
    with pytest.raises(InvalidInputError) as refused:
        glmtune.load_model(export)
    message = str(refused.value)
    assert base_fingerprint(base) in message and base_fingerprint(other_base) in message
    assert str(export / "glmtune-export.json") in message and str(other_base) in message


def test_the_override_loads_a_delta_over_another_base(exports, other_base, tmp_path):
    export = fingerprinted(exports.get("prefix", "v2"), tmp_path / "prefix", exports.get("base", "v2"), other_base)
    model = load_export(export, allow_base_mismatch=True)
    assert model.config.pre_seq_len == 4


def test_the_base_it_was_trained_over_loads_wherever_it_lives(exports, tmp_path, trained_qa):
    from glmtune_inference.chat import ChatModel

    base = exports.get("base", "v2")
    moved = Path(shutil.copytree(base, tmp_path / "moved-base", ignore=shutil.ignore_patterns(FINGERPRINT_FILE)))
    export = fingerprinted(exports.get("adapter", "v2"), tmp_path / "adapter", base, moved)
    served = load_served_models(str(export))
    query, answer = trained_qa["adapter"][0]
    assert ChatModel(next(iter(served.values()))).chat(query, do_sample=False, max_new_tokens=24)[0] == answer


def test_serving_an_adapter_over_another_base_is_refused_unless_allowed(exports, other_base, tmp_path):
    base = exports.get("base", "v2")
    export = fingerprinted(exports.get("adapter", "v2"), tmp_path / "adapter", base, base)
    with pytest.raises(InvalidInputError) as refused:
        load_served_models(str(other_base), {"tuned": str(export)})
    assert base_fingerprint(base) in str(refused.value) and base_fingerprint(other_base) in str(refused.value)
    served = load_served_models(str(other_base), {"tuned": str(export)},
                                options=LoadOptions(allow_base_mismatch=True))
    assert set(served) == {"m", "tuned"}
    assert set(load_served_models(str(base), {"tuned": str(export)})) == {"base-v2", "tuned"}


def test_serve_and_chat_refuse_another_base_with_exit_code_2_and_take_the_override_flag(exports, other_base,
                                                                                        tmp_path, capsys):
    import argparse

    from glmtune_app.cli import main
    from glmtune_inference.cli import _load_options, register

    base = exports.get("base", "v2")
    export = fingerprinted(exports.get("adapter", "v2"), tmp_path / "adapter", base, base)
    assert main(["serve", str(other_base), "--adapter", f"tuned={export}", "--port", "0"]) == 2
    assert base_fingerprint(other_base) in capsys.readouterr().err
    assert main(["chat", str(other_base), "--adapter", str(export)]) == 2
    assert base_fingerprint(base) in capsys.readouterr().err
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    for command in ("serve", "chat"):
        assert _load_options(parser.parse_args([command, "m", "--allow-base-mismatch"])).allow_base_mismatch
        assert not _load_options(parser.parse_args([command, "m"])).allow_base_mismatch


def test_an_export_written_before_fingerprints_loads_over_any_base(exports, other_base):
    assert set(load_served_models(str(other_base), {"tuned": str(exports.get("adapter", "v2"))})) == {"m", "tuned"}


@pytest.mark.parametrize(("shipped", "refused"), [("base", False), ("other", True)])
def test_a_base_shipped_inside_the_export_is_checked_too(exports, other_base, tmp_path, shipped, refused):
    base = exports.get("base", "v2")
    export = Path(shutil.copytree(exports.get("prefix", "v2"), tmp_path / "bundled"))
    shutil.copytree(base if shipped == "base" else other_base, export / "base",
                    ignore=shutil.ignore_patterns(FINGERPRINT_FILE))
    shipped_export = fingerprinted(export, tmp_path / "with-fp", base, "base")
    if refused:
        with pytest.raises(InvalidInputError, match=base_fingerprint(other_base)):
            load_served_models(str(shipped_export))
    else:
        assert load_served_models(str(shipped_export))
        # Writing the bundled base's fingerprint cache left the export's checksummed files as they were.
        storage.verify_manifest(shipped_export)
