"""`glmtune_inference.serving`: the one entry that loads and serves (the CLI and `glmtune run --serve` both call
`serve`; tests/app/test_pipeline_stages.py serves through it end to end). Its limits are checked before any load."""

from __future__ import annotations

import pytest
from glmtune_app.cli import main
from glmtune_inference.serving import ServeOptions

from glmtune.errors import InvalidInputError


@pytest.mark.parametrize(("field", "flag"), [("max_batch", "--max-batch"), ("queue_size", "--queue-size"),
                                             ("max_prompt_tokens", "--max-prompt-tokens"),
                                             ("default_max_tokens", "--default-max-tokens")])
def test_limits_below_one_are_refused_naming_the_flag(field: str, flag: str) -> None:
    with pytest.raises(InvalidInputError) as refused:
        ServeOptions(**{field: 0})
    assert refused.value.where == flag


def test_a_negative_drain_notice_is_refused_before_loading_anything(tmp_path, capsys) -> None:
    assert main(["serve", str(tmp_path / "absent"), "--drain-notice", "-1"]) == 2
    assert "--drain-notice" in capsys.readouterr().err
