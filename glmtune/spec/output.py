"""`spec.output`: where the fine-tuned model is exported and in which form."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from glmtune.spec.base import SpecModel, StorageUri

Bits = Literal[4, 8]


class OutputSpec(SpecModel):
    """The export written at the end of a run (layout: the export contract, glmtune-export.json)."""

    uri: StorageUri = Field(
        description="Where the exported model goes: a local directory, `s3://bucket/prefix` or `pvc://claim/path`."
    )
    export: Literal["merged", "adapter"] | None = Field(
        None,
        description=(
            "`merged`: a full model with the tuning folded in (loadable without glmtune; lora, adalora, freeze, "
            "full); `adapter`: only the tuned parameters (LoRA adapter or ptv2 prefix) applied over `model.uri`. "
            "Absent: `adapter` for ptv2 (a prefix cannot be merged), `merged` for the other methods."
        ),
    )
    bits: Bits | None = Field(
        None,
        description="Re-quantize a merged or full export to int8 or int4 weight-only (absent: keep the dtype; "
        "not for adapter or ptv2 exports).",
    )
