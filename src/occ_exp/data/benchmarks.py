"""Math problems from JSONL files: the paper's six evaluation benchmarks and file-backed training
sets (DAPO-Math-17k), plus the tiny task's held-out split as one more benchmark.

    <paths.data_dir>/aime24.jsonl, aime25, amc23, math500, minerva_math, olympiadbench
    <paths.data_dir>/dapo_math.jsonl

One JSON object per line, `{"problem": ..., "answer": ...}`: the problem text already carries its
instruction (the benchmarks: "Please reason step by step, and put your final answer within
\\boxed{}."; DAPO-Math-17k: "... The last line of your response should be of the form
Answer: $Answer ..."), the answer is the reference final answer. Rows in DAPO's own layout (a
chat-format `prompt` list holding one user message, the answer in `reward_model.ground_truth` or
`label`) are read too. `python scripts/fetch_data.py --data-dir <dir>` writes these files.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from occ_exp.config import MAX_ROW_CHARS
from occ_exp.data.jsonl import DataError, iter_jsonl_lines
from occ_exp.data.tasks import CountdownTask, Problem

#: Column headers of the results table, in the order of the paper's Table 1; `tiny` comes last.
BENCHMARKS: dict[str, str] = {
    "aime24": "AIME24",
    "aime25": "AIME25",
    "amc23": "AMC23",
    "math500": "MATH500",
    "minerva_math": "Minerva",
    "olympiadbench": "Olympiad",
    "tiny": "Tiny",
}
PAPER_BENCHMARKS = ("aime24", "aime25", "amc23", "math500", "minerva_math", "olympiadbench")
#: benchmark=tiny: held-out countdown problems (a fixed seeded draw; a limit takes a prefix).
TINY_HELD_OUT = 1000
TINY_SEED = 20_000


def fetch_hint(data_dir: str | Path) -> str:
    return f"python scripts/fetch_data.py --data-dir {data_dir}"


@dataclass
class Benchmark:
    name: str
    problems: list[Problem]
    reward: str  # which reward scores it (occ_exp.reward.rewards.REWARDS): "math" or "countdown"


# -- reading rows -------------------------------------------------------------------------------
def read_jsonl(path: str | Path, max_row_chars: int = MAX_ROW_CHARS) -> list[tuple[int, dict]]:
    """(line number, row) for every non-blank line of a JSONL file; a missing file or a bad line is
    a DataError naming it (and, for a missing or empty file, the fetch command)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found; fetch the data with `{fetch_hint(path.parent)}` "
                        "(or point paths.data_dir at a folder that has it)")
    rows = list(iter_jsonl_lines(path, max_row_chars=max_row_chars))
    if not rows:
        raise DataError(f"{path} has no rows; re-fetch it with `{fetch_hint(path.parent)}`")
    return rows


def _problem_text(row: dict, where: str) -> str:
    if isinstance(row.get("problem"), str):
        return row["problem"]
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):  # chat format, as DAPO-Math-17k ships it
        roles = [m.get("role") if isinstance(m, dict) else None for m in prompt]
        if roles != ["user"] or not isinstance(prompt[0].get("content"), str):
            raise DataError(f"{where}: 'prompt' must be a chat list holding one user message; got roles {roles}")
        return prompt[0]["content"]
    raise DataError(f"{where}: no problem text: expected a string 'problem' (or a chat-format 'prompt'); "
                    f"fields are {sorted(row)}")


def _answer_text(row: dict, where: str) -> str:
    reward_model = row.get("reward_model") if isinstance(row.get("reward_model"), dict) else {}
    for value in (row.get("answer"), row.get("label"), reward_model.get("ground_truth")):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and str(value).strip():
            return str(value).strip()
    raise DataError(f"{where}: no answer: expected a non-empty 'answer' (or 'label', or "
                    f"'reward_model.ground_truth'); fields are {sorted(row)}")


def row_to_problem(row: dict, where: str, template: str = "{problem}") -> Problem:
    """One data row as a Problem; `template` wraps the problem text (`{problem}` marks where)."""
    text = _problem_text(row, where)
    return Problem(template.replace("{problem}", text), _answer_text(row, where))


def load_problems(path: str | Path, template: str = "{problem}", max_row_chars: int = MAX_ROW_CHARS) -> list[Problem]:
    """Problems of a JSONL file, in file order (rows over `max_row_chars` characters are refused)."""
    if "{problem}" not in template:
        raise DataError(f"data.prompt_template must contain {{problem}}, got {template!r}")
    path = Path(path)
    return [row_to_problem(row, f"{path}:{line_no}", template) for line_no, row in read_jsonl(path, max_row_chars)]


def dedup(problems: list[Problem]) -> list[Problem]:
    """Drop repeated prompts, keeping the first occurrence (DAPO-Math-17k repeats each ~100x)."""
    seen: set[str] = set()
    return [p for p in problems if not (p.prompt in seen or seen.add(p.prompt))]


# -- benchmarks ---------------------------------------------------------------------------------
def benchmark_path(name: str, data_dir: str | Path) -> Path:
    return Path(data_dir) / f"{name}.jsonl"


def _subset(problems: list[Problem], limit: int) -> list[Problem]:
    """At most `limit` problems (0 = all): a fixed seeded subset, kept in file order."""
    if not limit or limit >= len(problems):
        return problems
    keep = sorted(random.Random(0).sample(range(len(problems)), limit))
    return [problems[i] for i in keep]


def load_benchmark(name: str, data_dir: str | Path, data_cfg=None, limit: int = 0) -> Benchmark:
    """A benchmark by name. `tiny` draws the countdown task's held-out split (its settings from
    `data_cfg`); the others read `<data_dir>/<name>.jsonl`. `limit` caps the problem count."""
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark {name!r}; choose from {list(BENCHMARKS)}")
    if name == "tiny":
        task = CountdownTask.from_config(data_cfg) if data_cfg is not None else CountdownTask()
        return Benchmark(name, task.problems(limit or TINY_HELD_OUT, seed=TINY_SEED, split="test"), "countdown")
    path = benchmark_path(name, data_dir)
    if not path.is_file():
        raise DataError(f"benchmark {name}: {path} not found; fetch the benchmarks with "
                        f"`{fetch_hint(data_dir)}` (or set paths.data_dir to a folder that has them)")
    max_chars = data_cfg.max_row_chars if data_cfg is not None else MAX_ROW_CHARS
    return Benchmark(name, _subset(load_problems(path, max_row_chars=max_chars), limit), "math")


def load_benchmarks(names: Sequence[str], data_dir: str | Path, data_cfg=None, limit: int = 0) -> list[Benchmark]:
    """All named benchmarks, every file checked before any model work starts."""
    return [load_benchmark(n, data_dir, data_cfg, limit) for n in names]


# -- file-backed training data ------------------------------------------------------------------
class MathDataset(Sequence):
    """A finite training set of math problems from a JSONL file (data=dapo_math), deduplicated by
    problem text; scored by the math reward. The trainer's PromptStream reads it in a fresh
    seeded order each epoch; `sample` draws single problems as the procedural task does."""

    def __init__(self, path: str | Path, template: str = "{problem}", max_row_chars: int = MAX_ROW_CHARS):
        self.path = Path(path)
        rows = load_problems(self.path, template, max_row_chars)
        self.problems = dedup(rows)
        self.duplicates = len(rows) - len(self.problems)

    def __len__(self) -> int:
        return len(self.problems)

    def __getitem__(self, i):
        return self.problems[i]

    def sample(self, rng: random.Random, split: str = "train") -> Problem:
        """A training problem drawn uniformly with `rng`: the draw every kind of training data answers
        (as CountdownTask.sample does), e.g. for the MTP warm-up of fresh heads."""
        if split != "train":
            raise ValueError(f"{self.path} is training data and has no held-out split ({split!r}); "
                             "held-out problems come from the benchmarks (benchmark=...)")
        return self.problems[rng.randrange(len(self.problems))]
