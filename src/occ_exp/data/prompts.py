"""Problem text -> model input, in one place for training and evaluation.

A chat model (MiMo-7B-RL, Qwen-Instruct) sees the problem as one user message inside its
tokenizer's chat template, followed by the assistant turn's opening (`add_generation_prompt`);
the tiny model and base models see the raw text. `model.chat_template=true` (the default) applies
the template wherever the tokenizer has one; the tiny tokenizer has none.
"""

from __future__ import annotations


def uses_chat_template(tokenizer, enabled: bool) -> bool:
    return bool(enabled) and getattr(tokenizer, "chat_template", None) is not None


def format_prompts(problems, tokenizer, chat_template: bool = True) -> list[str]:
    """The text the rollout engine tokenizes for each problem (`Problem.prompt` is the raw text)."""
    texts = [p.prompt for p in problems]
    if not uses_chat_template(tokenizer, chat_template):
        return texts
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
            for t in texts]
