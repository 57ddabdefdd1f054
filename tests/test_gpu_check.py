"""scripts/gpu_check: the random model it builds, its arithmetic, the wheels it carries, and the
whole check end to end in its CPU toy mode (every part reports a status, also when one fails)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import compose_cfg

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check  # its dataclasses look their module up
spec.loader.exec_module(gpu_check)
WHEELS = ROOT / ".gpu_wheels"


def test_full_size_model_is_qwen05b_shaped():
    from transformers import Qwen2Config

    from occ_exp.plan import model_size

    size = model_size(Qwen2Config(**gpu_check.QWEN05B), 1)
    assert size.total - size.mtp == 494_032_768  # Qwen2.5-0.5B's published parameter count


def _fake_run(tmp_path: Path, name: str, overrides: list[str], rows: list[dict]) -> Path:
    run = tmp_path / name
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(compose_cfg(overrides), run / ".hydra" / "config.yaml")
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_learner_numbers_count_shared_prompts_once_and_skip_the_warm_up_step(tmp_path):
    gpu_check.make_model(tmp_path / "model", toy=True)
    common = [f"model.path={tmp_path / 'model'}", "data.prompts_per_step=4", "algorithm.group_size=4"]
    rows = [{"step": s, "time/step_s": 9.0, "time/rollout_s": 3.0, "time/logp_old_s": 1.0,
             "time/update_s": (100.0 if s == 1 else 2.0), "rollout/tokens": 1600, "rollout/response_len": 60.0,
             "mem/update_peak_gib": 7.5, "mem/rollout_peak_gib": 3.0} for s in (1, 2, 3)]
    shared = gpu_check.learner_numbers(_fake_run(tmp_path, "shared", [*common, "model.share_prompts=true"], rows),
                                       peak=1e12, sheet=2e12)
    plain = gpu_check.learner_numbers(_fake_run(tmp_path, "plain", [*common, "model.share_prompts=false"], rows),
                                      peak=1e12, sheet=2e12)

    from occ_exp.plan import model_config, model_size, train_flops_per_token

    size = model_size(model_config(compose_cfg(common).model)[0], 1)
    resp = 60.0 * 16  # 16 rows of 60 response tokens; the other 640 tokens are 4 prompts x 4 copies
    assert shared["learner_tokens"] == resp + (1600 - resp) / 4 and plain["learner_tokens"] == 1600
    flops = shared["learner_tokens"] * train_flops_per_token(size, 1600 / 16)
    assert shared["update_s"] == 2.0  # step 1 (100 s: warm-up) is left out of the median
    assert shared["mfu_measured"] == pytest.approx(flops / 2.0 / 1e12)
    assert shared["mfu_sheet"] == pytest.approx(shared["mfu_measured"] / 2)
    assert shared["peak_update_gib"] == 7.5 and plain["mfu_measured"] > shared["mfu_measured"]


def test_tiny_target_fits_the_step_count_to_the_time_left():
    runs = [{"step": 6, "step_s": 1.0, "eval_s": 0.0, "final_eval_s": 4.0},
            {"step": 5, "step_s": 2.0, "eval_s": 0.0, "final_eval_s": 4.0}]
    assert gpu_check.tiny_target(runs, remaining_s=1000, n_max=50, eval_every=0, restart_s=10) is None  # all fit
    n = gpu_check.tiny_target(runs, remaining_s=100, n_max=400, eval_every=0, restart_s=10)
    assert n == 5 + (100 - 10 - 4) // 2  # the slowest run decides: 10 s restart, 4 s final evaluation
    with_evals = gpu_check.tiny_target(runs, remaining_s=100, n_max=400, eval_every=10, restart_s=10)
    assert with_evals is not None and with_evals <= n
    # even with no time left, two more steps than the furthest run: it may finish one more before it
    # stops, and one resumed at its last step would skip its final evaluation
    assert gpu_check.tiny_target(runs, remaining_s=0, n_max=400, eval_every=0, restart_s=10) == 8


def test_last_error_line_skips_torchrun_summary():
    log = ("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
           "TypeError: 'NoneType' object is not subscriptable\n"
           "E1202 torch.distributed.elastic.multiprocessing.api: failed (exitcode: 1)\n"
           "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n" + "=" * 40 + "\n"
           "occ_exp.train FAILED\n" + "-" * 40 + "\nFailures:\n  <NO_OTHER_FAILURES>\n" + "=" * 40 + "\n")
    assert gpu_check.last_error_line(log) == "TypeError: 'NoneType' object is not subscriptable"
    assert gpu_check.last_error_line("all fine\nlast words\n") == "last words"


def _write_wheel(folder: Path, name: str, version: str, requires: list[str]) -> None:
    dist = f"{name.replace('-', '_')}-{version}"
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as z:
        z.writestr(f"{dist}.dist-info/METADATA", "Metadata-Version: 2.1\nName: {}\nVersion: {}\n{}".format(
            name, version, "".join(f"Requires-Dist: {r}\n" for r in requires)))


def test_wheel_check_finds_missing_pins_and_unmet_requirements(tmp_path):
    pins = gpu_check.wheel_pins()
    assert {n for n, _ in pins} >= {"hydra-core", "omegaconf", "antlr4-python3-runtime", "math-verify"}
    assert not {gpu_check._norm(n) for n, _ in pins} & {"torch", "transformers"}  # the machine's own, never carried
    for name, version in pins:
        _write_wheel(tmp_path, name, version, ["PyYAML>=5.1", 'pytest; extra == "dev"'])
    assert gpu_check.check_wheels(tmp_path) == []
    _write_wheel(tmp_path, "extra-pkg", "1.0", ["no-such-dependency>=1", "omegaconf<2.0"])
    problems = gpu_check.check_wheels(tmp_path)
    assert any("no-such-dependency" in p for p in problems) and any("omegaconf<2.0" in p for p in problems)
    (tmp_path / f"{pins[0][0].replace('-', '_')}-{pins[0][1]}-py3-none-any.whl").unlink()
    assert any(f"no wheel for {pins[0][0]}" in p for p in gpu_check.check_wheels(tmp_path))


def test_wheel_pins_match_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    from packaging.requirements import Requirement

    deps = {gpu_check._norm(Requirement(d).name): Requirement(d)
            for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    for name, version in gpu_check.wheel_pins():
        req = deps.get(gpu_check._norm(name))
        assert req is None or req.specifier.contains(version), f"{name}=={version} against pyproject's {req}"


@pytest.mark.skipif(not WHEELS.is_dir() or not list(WHEELS.glob("*.whl")), reason="no .gpu_wheels (make gpu-wheels)")
def test_carried_wheels_are_complete_and_install_and_import(tmp_path):
    assert gpu_check.check_wheels(WHEELS) == []
    total = sum(f.stat().st_size for f in WHEELS.glob("*.whl"))
    assert total < 16 * 2**20  # far inside the 64 MiB a device call carries
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--target", str(site), *map(str, WHEELS.glob("*.whl"))], check=True, timeout=300)
    assert not (site / "torch").exists() and not (site / "transformers").exists()
    probe = ("import hydra, omegaconf, math_verify, latex2sympy2_extended, antlr4, sys; "
             "print('\\n'.join(m.__file__ for m in (hydra, omegaconf, math_verify, latex2sympy2_extended, antlr4)))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(site)}).stdout.split()
    assert len(out) == 5 and all(f.startswith(str(site)) for f in out)  # from the carried wheels, not this venv


def _toy_check(tmp_path: Path, **env) -> tuple[subprocess.CompletedProcess, str, dict]:
    results = tmp_path / "results"
    env = {**os.environ, "GPU_CHECK_TOY": "1", "GPU_CHECK_RESULTS": str(results), "GPU_CHECK_DIR": str(tmp_path / "w"),
           "PYTHONPATH": str(ROOT / "src"), **env}
    p = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    report = (results / "gpu_check.md").read_text()
    statuses = {}
    for name, title in gpu_check.TITLES.items():
        row = next((l for l in report.splitlines() if l.startswith(f"| {title} |")), None)
        assert row is not None, f"no row for part {name} in the report:\n{report}"
        statuses[name] = re.search(r"\*\*(.+?)\*\*", row).group(1)
    return p, report, statuses


@pytest.mark.heavy  # make test-all only (minutes on 2 cores); see pyproject markers
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_toy_check_runs_every_part_and_reports_each(tmp_path):
    p, report, statuses = _toy_check(tmp_path)
    assert "No GPU run happened" in report and gpu_check.DEVICE_COMMAND in report
    assert set(statuses) == set(gpu_check.PARTS)
    assert all(s in ("ok", "failed", "timed out") for s in statuses.values()), statuses
    summary = json.loads((tmp_path / "results" / "gpu_check" / "summary.json").read_text())["parts"]
    for name in gpu_check.PARTS:
        assert statuses[name] == "ok", f"part {name}: {statuses[name]}\n{report}\n{p.stdout[-3000:]}"
    assert (p.returncode == 0) == all(s == "ok" for s in statuses.values())
    assert summary["c"]["numbers"]["resume"]["tensors_equal"] is True
    assert summary["a"]["numbers"]["mfu_measured"] > 0
    assert len(summary["d"]["numbers"]["accuracy"]) == len(gpu_check.REGIMES)  # one finished run per regime
    assert (tmp_path / "results" / "gpu_check" / "table1_tiny_gpu.md").exists()
    assert "vLLM on CUDA" in report and "NCCL across GPUs" in report


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_failing_part_still_yields_a_report(tmp_path):
    p, report, statuses = _toy_check(tmp_path, GPU_CHECK_PARTS="b,e", GPU_CHECK_FAIL="b")
    assert p.returncode == 1
    assert statuses["b"] == "failed" and statuses["e"] == "ok"
    assert all(statuses[n] == "skipped" for n in ("setup", "peak", "a", "c", "d"))
    row = next(l for l in report.splitlines() if l.startswith(f"| {gpu_check.TITLES['b']} |"))
    assert "trainer.total_steps" in row  # the error's own line (the injected config error), not a traceback


HEARTBEAT = """[rank0]:[W1204 15:58:15.352103881 TCPStore.cpp:106] [c10d] sendBytes failed on SocketImpl(fd=47): Broken pipe
Exception raised from sendBytes at /pytorch/torch/csrc/distributed/c10d/Utils.hpp:653 (most recent call first):
frame #0: c10::Error::Error(c10::SourceLocation, std::string) + 0x9d (0x7f5a0e77305d in libc10.so)
frame #1: <unknown function> + 0x6a90931 (0x7f5977a90931 in libtorch_cpu.so)

[rank0]:[W1204 15:58:14.350527936 ProcessGroupNCCL.cpp:1826] [PG ID 0 PG GUID 0(default_pg) Rank 0] Failed to check the "should dump" flag on TCPStore, (maybe TCPStore server has shut down too early), with error: Broken pipe
"""


def test_a_logs_tail_keeps_the_lines_that_say_where_a_run_was():
    """On the H200 the last 150 lines of a timed-out torchrun part were all NCCL's heartbeat complaining
    after the launcher ended, so nothing said how far the run had got."""
    text = "step 2 done\nstep 3 rollout\n" + HEARTBEAT * 40
    text += "/x/extract.py:170: SyntaxWarning: invalid escape sequence '\\s'\n  \"\"\"Decide\n"
    tail = gpu_check.log_tail(text, 150)
    assert tail.splitlines()[:2] == ["step 2 done", "step 3 rollout"]
    assert "frame #" not in tail and "TCPStore" not in tail and "SyntaxWarning" not in tail
    assert "NCCL heartbeat" in tail  # the dropped lines are counted, not hidden


def test_a_timed_out_part_leaves_every_python_stack_in_its_log(tmp_path):
    """A part past its time limit gets SIGABRT first: with PYTHONFAULTHANDLER=1 (the parts' environment)
    every Python process of it writes where each of its threads was, then it is ended."""
    log = tmp_path / "hang.log"
    code = "import time\ndef waiting_for_a_collective():\n    time.sleep(120)\nwaiting_for_a_collective()\n"
    p = gpu_check.launch([sys.executable, "-c", code], log, gpu_check.child_env(1))
    time.sleep(3)  # started
    with pytest.raises(gpu_check.PartTimeout, match="stacks in its log"):
        gpu_check.wait_all([p], deadline=0.0, what="hang")
    text = log.read_text()
    assert "waiting_for_a_collective" in text and "most recent call first" in text
    assert p.poll() is not None
