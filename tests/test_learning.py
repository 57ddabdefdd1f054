"""The loop learns: a short RL run of the default tiny model raises held-out accuracy above its
warm start (sampled accuracy at temperature 1, the quantity RL optimises; the paper's metric is
avg@k of sampled answers too). It starts from the warm start shipped with the package (the
default key; nothing is trained before RL) and runs the default fast path (static-cache decoding,
the sampler's log-probs as logp_old)."""

import json

import pytest

from occ_exp.trainer import train
from tests.conftest import compose_cfg


@pytest.mark.heavy  # make test-all only (minutes on 2 cores); see pyproject markers
@pytest.mark.slow
def test_short_rl_run_raises_held_out_accuracy(cache_dir, tmp_path):
    cfg = compose_cfg([
        f"paths.cache_dir={cache_dir}", "logger=jsonl", "regime=occ", "trainer.progress=false",
        "trainer.total_steps=50", "trainer.eval_every=0", "trainer.save_every=0",
        "trainer.eval_problems=512", "trainer.final_eval_problems=512", "eval.k=2", "eval.temperature=1.0",
    ])
    train(cfg, tmp_path, log=lambda *_: None)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    before = rows[0]["eval/accuracy"]  # step 0: the warm start
    after = rows[-1]["eval/accuracy"]  # the final evaluation, same 512 problems x 2 samples
    assert rows[0]["step"] == 0 and rows[-1]["eval/final"] == 1
    assert after > before + 0.03, (before, after)
