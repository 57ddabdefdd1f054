"""`python -m occ_exp.plot` writes the figures for a run or a multirun directory."""

import json

import pytest
from omegaconf import OmegaConf

from occ_exp.plot import aggregate, main, run_label


def _fake_run(d, regime, seed, overrides=(), diag=True, steps=6):
    (d / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"regime": {"name": regime}, "seed": seed}), d / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create([f"regime={regime}", f"seed={seed}", *overrides]), d / ".hydra" / "overrides.yaml")
    rows = [{"step": 0, "eval/accuracy": 0.1}]
    for s in range(1, steps + 1):
        r = {"step": s, "mtp/coef": 0.01 * s * (seed + 1), "mtp/corr_proxy": 0.1, "mtp/penalty_proxy": 2.0,
             "reward/mean": 0.2 + 0.01 * s, "mtp/acceptance": 0.9, "eval/accuracy": 0.3}
        if diag and s % 2 == 0:
            r.update({"diag/corr": -0.01, "diag/penalty": 3.0, "diag/lambda_star": -0.003})
        rows.append(r)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_multirun_dir_gives_one_png_per_figure(tmp_path, capsys):
    _fake_run(tmp_path / "a", "occ", 0)
    _fake_run(tmp_path / "b", "occ", 1)
    _fake_run(tmp_path / "c", "detach", 0, diag=False)
    _fake_run(tmp_path / "d", "occ", 0, overrides=["regime.estimator=exact", "trainer.total_steps=6"])
    assert main([str(tmp_path)]) == 0
    written = capsys.readouterr().out.split()
    names = sorted(p.rsplit("/", 1)[-1] for p in written)
    assert names == sorted(f"{n}.png" for n in ("lambda", "corr", "penalty", "reward", "accuracy", "acceptance"))
    for p in written:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert run_label(tmp_path / "d") == "occ regime.estimator=exact"
    assert run_label(tmp_path / "a") == run_label(tmp_path / "b") == "occ"


def test_seeds_are_averaged_and_sparse_keys_kept():
    runs = [[{"step": 1, "x": 1.0}, {"step": 2, "x": 3.0}], [{"step": 1, "x": 3.0}, {"step": 3, "x": 5.0}]]
    steps, mean, lo, hi = aggregate(runs, "x")
    assert steps.tolist() == [1, 2, 3] and mean.tolist() == [2.0, 3.0, 5.0] and lo.tolist() == [1.0, 3.0, 5.0]
    steps, mean, _, _ = aggregate(runs[:1], "x", smooth=2)
    assert mean.tolist() == [1.0, 2.0]
    assert aggregate(runs, "missing") is None


def test_no_metrics_is_a_clear_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
