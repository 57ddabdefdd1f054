"""Training prompts and their text: `PromptStream` (the seeded, resumable order in which training
draws problems) and problem text -> model input, in one place for training and evaluation.

A chat model (MiMo-7B-RL, Qwen-Instruct) sees the problem as one user message inside its
tokenizer's chat template, followed by the assistant turn's opening (`add_generation_prompt`);
the tiny model and base models see the raw text. `model.chat_template=true` (the default) applies
the template wherever the tokenizer has one; the tiny tokenizer has none.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field


def uses_chat_template(tokenizer, enabled: bool) -> bool:
    return bool(enabled) and getattr(tokenizer, "chat_template", None) is not None


def format_prompts(problems, tokenizer, chat_template: bool = True) -> list[str]:
    """The text the rollout engine tokenizes for each problem (`Problem.prompt` is the raw text)."""
    texts = [p.prompt for p in problems]
    if not uses_chat_template(tokenizer, chat_template):
        return texts
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
            for t in texts]


@dataclass
class PromptStream:
    """Training prompts, seeded and resumable (its state is the data-loader position a checkpoint
    stores). A procedural task (data=tiny) draws each problem from a seeded RNG; a finite data set
    (a Sequence of problems, e.g. data=dapo_math) is read in a fresh seeded order each epoch."""

    task: object
    seed: int
    rng: random.Random = field(init=False)
    epoch: int = field(init=False, default=0)
    pos: int = field(init=False, default=0)

    def __post_init__(self):
        self.rng = random.Random(f"prompts-{self.seed}")
        self._order: list[int] | None = None

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            self._order = list(range(len(self.task)))
            random.Random(f"prompts-{self.seed}-epoch-{self.epoch}").shuffle(self._order)
        return self._order

    def next(self, n: int) -> list:
        if not isinstance(self.task, Sequence):
            return [self.task.sample(self.rng, "train") for _ in range(n)]
        out = []
        while len(out) < n:
            if self.pos == len(self.task):
                self.epoch, self.pos, self._order = self.epoch + 1, 0, None
            out.append(self.task[self._epoch_order()[self.pos]])
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
        self.epoch, self.pos, self._order = state.get("epoch", 0), state.get("pos", 0), None
