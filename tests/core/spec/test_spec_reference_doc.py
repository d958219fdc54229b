"""docs/spec-reference.md is generated from the spec model and must match it."""

from __future__ import annotations

from testkit import REPO_ROOT

from glmtune.spec_docs import REGENERATE, render_spec_reference


def test_committed_spec_reference_is_up_to_date() -> None:
    committed = (REPO_ROOT / "docs" / "spec-reference.md").read_text(encoding="utf-8")
    assert committed == render_spec_reference(), (
        f"docs/spec-reference.md is stale; regenerate it: {REGENERATE}"
    )


def test_reference_has_a_table_per_section_with_defaults() -> None:
    text = render_spec_reference()
    for section in (
        "spec.model",
        "spec.data",
        "spec.method.lora",
        "spec.training.deepspeed",
        "spec.serving",
        "status",
    ):
        assert f"## `{section}`" in text
    assert (
        "| `spec.method.lora.r` | integer, ≤ 4096, > 0 |" in text
        or "| `spec.method.lora.r` | integer" in text
    )
    assert "| `spec.data.maxLength` | integer, ≥ 16, ≤ 131072 | `512` |" in text
