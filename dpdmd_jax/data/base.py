"""What most data sources share: host arrays that need no device step, and no prompts of their own."""

from __future__ import annotations

from collections.abc import Sequence

from dpdmd_jax.core import Cond, NoPrompts, RoundBatch


class HostSource:
    """A `core.DataSource` whose rounds are finished host arrays and which cannot encode prompts;
    a subclass sets `no_prompts` (why, and what to use instead) and overrides what it can do."""

    no_prompts = "this data source has no prompts"

    def encode(self, batch: RoundBatch) -> RoundBatch:
        return batch  # host arrays: nothing left to do on device

    def prompts(self) -> Sequence[str]:
        raise NoPrompts(f"{self.no_prompts}; pass a prompt file")

    def prompt_problems(self, prompts: Sequence[str]) -> list[str]:
        return []

    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        raise NoPrompts(f"{self.no_prompts}: new prompts need a pipeline's text encoders (data.kind='prompts')")

    def eval_cond(self, n: int) -> Cond:
        raise NoPrompts(self.no_prompts)
