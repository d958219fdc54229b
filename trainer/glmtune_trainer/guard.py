"""The NaN/Inf guard: a bad step is skipped and counted; too many in a row stop the run with advice.

fp16 losses turning NaN is the most reported failure of ChatGLM fine-tuning; one bad batch must not
poison the weights, and a run that only produces bad steps must stop instead of burning GPU hours.
"""

from __future__ import annotations

from dataclasses import dataclass

from glmtune.errors import GlmtuneError


class NonFiniteLossError(GlmtuneError):
    """Raised after `max_consecutive` non-finite steps in a row."""


@dataclass
class NonFiniteGuard:
    """Counts skipped steps; `record(ok)` returns whether the step may be applied."""

    max_consecutive: int = 10
    precision: str = "fp32"
    skipped_total: int = 0
    consecutive: int = 0

    def record(self, finite: bool, step: int) -> bool:
        """Register one optimizer step's verdict; raise when the bad streak reaches the limit."""
        if finite:
            self.consecutive = 0
            return True
        self.skipped_total += 1
        self.consecutive += 1
        if self.max_consecutive > 0 and self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(self.advice(step))
        return False

    def advice(self, step: int) -> str:
        """The message a user sees when the run stops: what happened and what usually fixes it."""
        hint = (
            "fp16 overflows easily with ChatGLM: use precision bf16 (or fp32), "
            if self.precision == "fp16"
            else ""
        )
        return (
            f"loss or gradients were NaN/Inf for {self.consecutive} consecutive steps (up to step {step}, "
            f"{self.skipped_total} skipped in total); {hint}lower the learning rate, enable gradient clipping "
            "(training.max_grad_norm), or check the data for empty answers"
        )

    def state_dict(self) -> dict[str, int]:
        """Counters saved in checkpoints so a resumed run keeps counting."""
        return {"skipped_total": self.skipped_total, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore counters from a checkpoint."""
        self.skipped_total = int(state.get("skipped_total", 0))
        self.consecutive = int(state.get("consecutive", 0))
