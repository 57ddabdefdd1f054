"""Bad input is refused with one clear message before work starts: malformed JSONL rows (file and
line), a checkpoint of another model size or regime (through the resume path and model.path), a
tokenizer without the needed special tokens; and, end to end through the CLI, config errors."""

import os
import subprocess
import sys
from functools import partial

import pytest

from occ_exp.checkpoint import TrainState, save_checkpoint
from occ_exp.data.jsonl import DataError, read_jsonl
from occ_exp.models.loading import CheckpointError, build_tiny_policy, save_policy
from occ_exp.trainer import train
from tests.conftest import ROOT, SHARED_BENCHMARKS, compose_cfg
from tests.reliability_log import record

# -- JSONL ------------------------------------------------------------------------------------
GOOD = '{"problem": "1+1?", "answer": "2"}\n'
MALFORMED = {
    "invalid_json": ('{"problem": "x", "answer": }\n', "not valid JSON"),
    "truncated_row": ('{"problem": "x", "ans\n', "not valid JSON"),
    "not_an_object": ('["problem", "answer"]\n', "expected a JSON object"),
    "missing_key": ('{"problem": "x"}\n', "missing or empty 'answer'"),
    "empty_value": ('{"problem": "", "answer": "3"}\n', "missing or empty 'problem'"),
    "null_value": ('{"problem": "x", "answer": null}\n', "missing or empty 'answer'"),
    "invalid_utf8": (b'{"problem": "\xff\xfe", "answer": "1"}\n', "not valid UTF-8"),
    "lone_surrogate_bytes": (b'{"problem": "\xed\xa0\x80", "answer": "1"}\n', "not valid UTF-8"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_jsonl_row_names_file_and_line(tmp_path, case):
    bad, expected = MALFORMED[case]
    path = tmp_path / "data.jsonl"
    bad = bad if isinstance(bad, bytes) else bad.encode()
    path.write_bytes(GOOD.encode() + b"\n" + GOOD.encode() + bad + GOOD.encode())  # the bad row is line 4
    with pytest.raises(DataError) as e:
        read_jsonl(path, required=("problem", "answer"))
    msg = str(e.value)
    assert msg.startswith(f"{path}:4: ") and expected in msg and "\n" not in msg
    record("bad_input", f"jsonl_{case}", refused=True, names_file_and_line=True)


def test_jsonl_accepts_blank_lines_and_bom(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\n  \n" + GOOD.encode())
    assert len(read_jsonl(path, required=("problem", "answer"))) == 2
    with pytest.raises(DataError, match="no such file"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_row_over_max_row_chars_is_refused_naming_file_and_line(tmp_path):
    """A row longer than data.max_row_chars is refused with file:line, before it is read whole (a
    50 MB row without line breaks used to be accepted and crash the run later in the tokenizer)."""
    from occ_exp.config import MAX_ROW_CHARS
    from occ_exp.data.benchmarks import MathDataset

    path = tmp_path / "data.jsonl"
    huge = b'{"problem": "' + b"7" * 20_000_000  # 20 MB, no closing quote nor line break
    path.write_bytes(GOOD.encode() * 2 + huge)
    for read in (lambda: read_jsonl(path), lambda: MathDataset(path)):
        with pytest.raises(DataError) as e:
            read()
        msg = str(e.value)
        assert msg.startswith(f"{path}:3: a row of more than") and f"data.max_row_chars={MAX_ROW_CHARS:,}" in msg
        assert "\n" not in msg
    pad = '{"problem": "", "answer": "1"}'
    exact = '{"problem": "' + "x" * (MAX_ROW_CHARS - len(pad)) + '", "answer": "1"}'
    assert len(exact) == MAX_ROW_CHARS
    path.write_text(GOOD + exact + "\n")
    assert len(read_jsonl(path)) == 2  # the limit itself is accepted, one more character is not
    path.write_text(GOOD + exact.replace("xx", "xxx", 1) + "\n")
    with pytest.raises(DataError, match=rf":2: a row of {MAX_ROW_CHARS + 1:,} characters is longer"):
        read_jsonl(path)
    with pytest.raises(DataError, match=":1: a row of 34 characters is longer than data.max_row_chars=20 "):
        read_jsonl(path, max_row_chars=20)
    record("bad_input", "jsonl_row_over_max_row_chars", refused=True, names_file_and_line=True, row_bytes=20_000_013,
           max_row_chars=MAX_ROW_CHARS)


def test_shared_benchmark_files_are_well_formed():
    files = sorted(SHARED_BENCHMARKS.glob("*.jsonl"))
    if not files:
        pytest.skip("no benchmark files next to this checkout")
    for f in files:
        assert read_jsonl(f, required=("problem", "answer"))


# -- checkpoints and tokenizers ---------------------------------------------------------------
def _cfg(smoke_overrides, *extra):
    return compose_cfg(smoke_overrides + ["model.warmstart.enabled=false", *extra])


def test_resume_from_checkpoint_of_another_size(smoke_overrides, tmp_path, tiny_policy):
    policy, tok = tiny_policy  # hidden 64, 2 layers, 2 MTP layers; the config below wants 128, 3, 1
    save_checkpoint(tmp_path, 5, partial(save_policy, policy, tok), TrainState(5), "x: 1\n")
    with pytest.raises(CheckpointError) as e:
        train(_cfg(smoke_overrides), tmp_path, log=lambda *_: None)
    msg = str(e.value)
    assert "another model size" in msg and "hidden_size: checkpoint 64 vs config 128" in msg
    assert "num_nextn_predict_layers: checkpoint 2 vs config 1" in msg
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before any work
    record("bad_input", "resume_checkpoint_other_size", refused=True)


def test_resume_with_optimizer_state_that_does_not_fit(smoke_overrides, tmp_path):
    """A checkpoint whose optimiser state covers other parameters (e.g. written by a regime that
    freezes the heads, or by another code version) is refused with a message, not an error deep
    in torch. Simulated by dropping parameters from a real checkpoint's optimiser state."""
    import torch

    from occ_exp.checkpoint import write_manifest

    short = ["trainer.total_steps=1", "trainer.eval_before_train=false", "trainer.eval_every=0",
             "trainer.final_eval_problems=4"]
    train(_cfg(smoke_overrides, *short), tmp_path, log=lambda *_: None)
    ckpt = tmp_path / "checkpoints" / "step_000001"
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    del state["optimizer"]["param_groups"][0]["params"][-3:]
    torch.save(state, ckpt / "trainer_state.pt")
    write_manifest(ckpt)
    with pytest.raises(CheckpointError, match="optimizer state does not fit"):
        train(_cfg(smoke_overrides, *short[1:], "trainer.total_steps=2"), tmp_path, log=lambda *_: None)
    record("bad_input", "resume_checkpoint_other_optimizer", refused=True)


def test_model_path_with_other_number_of_mtp_layers(smoke_overrides, tmp_path, tiny_policy):
    policy, tok = tiny_policy
    save_policy(policy, tok, tmp_path / "model")
    with pytest.raises(CheckpointError, match=r"has 2 MTP layer\(s\) but model.num_mtp_layers=1; set model.num_mtp_layers=2"):
        train(_cfg(smoke_overrides, f"model.path={tmp_path / 'model'}"), tmp_path / "run", log=lambda *_: None)
    record("bad_input", "model_path_other_mtp_layers", refused=True)


@pytest.mark.parametrize("missing", ["eos", "both", "no_tokenizer"])
def test_tokenizer_without_special_tokens(smoke_overrides, tmp_path, missing):
    cfg = compose_cfg(["model.num_mtp_layers=1"])
    policy, tok = build_tiny_policy(cfg.model)
    if missing in ("pad", "both"):
        tok.pad_token = None
    if missing in ("eos", "both"):
        tok.eos_token = None
    save_policy(policy, None if missing == "no_tokenizer" else tok, tmp_path / "model")
    with pytest.raises(CheckpointError) as e:
        train(_cfg(smoke_overrides, f"model.path={tmp_path / 'model'}"), tmp_path / "run", log=lambda *_: None)
    msg = str(e.value)
    if missing == "no_tokenizer":
        assert "no tokenizer files" in msg
    else:
        assert ("no eos token" if missing == "eos" else "no eos and no pad token") in msg  # nothing to pad with either
        assert "tok.save_pretrained" in msg
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    record("bad_input", f"tokenizer_{missing}", refused=True)


@pytest.mark.parametrize("case", ["unreadable", "not_json", "not_an_object", "unknown_model_type", "bad_setting"])
def test_model_folder_with_a_bad_config_json(tmp_path, case):
    """config.json that cannot be read, is not JSON / not an object, names a model_type transformers
    does not know, or holds a setting the config class refuses: one CheckpointError naming the file."""
    from occ_exp.models.loading import load_pretrained

    cfg = compose_cfg(["model.num_mtp_layers=1"])
    policy, tok = build_tiny_policy(cfg.model)
    save_policy(policy, tok, tmp_path / "model")
    config_json = tmp_path / "model" / "config.json"
    text = config_json.read_text()
    if case == "unreadable":  # (tests run as root, which reads any file: a folder in its place)
        config_json.unlink()
        config_json.mkdir()
    else:
        config_json.write_text({"not_json": text[:-40], "not_an_object": "[1, 2]",
                                "unknown_model_type": text.replace('"qwen2"', '"qwen9"'),
                                "bad_setting": text.replace('"vocab_size": ', '"vocab_size": "many", "x": ')}[case])
    with pytest.raises(CheckpointError) as e:
        load_pretrained(tmp_path / "model")
    msg = str(e.value)
    assert msg.startswith(f"{config_json}: ") and "\n" not in msg, msg
    assert {"unreadable": "cannot be read", "not_json": "not valid JSON", "not_an_object": "expected a JSON object",
            "unknown_model_type": "model_type 'qwen9' is not a model transformers",
            "bad_setting": "not a valid qwen2 config"}[case] in msg, msg
    record("bad_input", f"config_json_{case}", refused=True, one_line=True)


def test_tokenizer_without_pad_pads_with_eos(tmp_path):
    """Many checkpoints (Llama, Qwen base) ship no pad token: prompts are left-padded and masked, so
    the loader pads with eos (and says so) instead of refusing."""
    from occ_exp.models.loading import load_policy_folder

    cfg = compose_cfg(["model.num_mtp_layers=1"])
    policy, tok = build_tiny_policy(cfg.model)
    tok.pad_token = None
    save_policy(policy, tok, tmp_path / "model")
    _, tok2 = load_policy_folder(tmp_path / "model")
    assert tok2.pad_token_id == tok2.eos_token_id is not None


# -- the CLI: one message, no traceback, non-zero exit, before any work -----------------------
def _cli(tmp_path, *overrides):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"), COLUMNS="400")
    env.pop("OCC_EXP_FAULT", None)
    cmd = [sys.executable, "-m", "occ_exp.train", "experiment=smoke", "model.warmstart.enabled=false",
           f"hydra.run.dir={tmp_path / 'run'}", *overrides]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)


CLI_CASES = {
    "unknown_option": (["regime=nope"], "nope"),
    "unknown_key": (["regime.coeff=0.2"], "coeff"),
    "wrong_type": (["algorithm.group_size=many"], "group_size"),
    "negative_group_size": (["algorithm.group_size=-4"], "config error algorithm.group_size: must be >= 2"),
    "eps_zero": (["regime.eps=0"], "config error regime.eps: must be > 0"),
    "clip_high_below_low": (["algorithm.clip_high=-0.3"], "config error algorithm.clip_high: must be > 0"),
    "resume_not_a_checkpoint": (["trainer.resume=/nonexistent/step_000001"], "config error trainer.resume: "),
    "tokenizer_without_eos": (None, "checkpoint error "),
    "max_row_chars_zero": (["data.max_row_chars=0"], "config error data.max_row_chars: must be >= 1"),
    "data_row_too_long": ("data_row", "data error "),
    "config_json_not_json": ("config_json", "checkpoint error "),
    "config_json_unknown_model_type": ("model_type", "checkpoint error "),
}


def _bad_input_files(tmp_path, kind: str) -> list[str]:
    """Files for the CLI cases that need one: a data file with an over-long row, a model folder
    whose config.json is not JSON or names an unknown model_type, a tokenizer without eos."""
    if kind == "data_row":
        path = tmp_path / "data.jsonl"
        path.write_bytes(GOOD.encode() * 2 + b'{"problem": "' + b"1+" * 5_000_000 + b'1", "answer": "2"}\n')
        return ["data=dapo_math", f"data.path={path}", "data.prompts_per_step=4"]
    cfg = compose_cfg([])
    policy, tok = build_tiny_policy(cfg.model)
    if kind == "tokenizer":
        tok.eos_token = None
    save_policy(policy, tok, tmp_path / "model")
    config_json = tmp_path / "model" / "config.json"
    if kind == "config_json":
        config_json.write_text(config_json.read_text()[:-40])  # cut short, as by a full disk
    if kind == "model_type":
        config_json.write_text(config_json.read_text().replace('"model_type": "qwen2"', '"model_type": "qwen9"'))
    return [f"model.path={tmp_path / 'model'}"]


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_refuses_bad_input_in_one_message(tmp_path, case):
    overrides, expected = CLI_CASES[case]
    if not isinstance(overrides, list):
        overrides = _bad_input_files(tmp_path, overrides or "tokenizer")
    p = _cli(tmp_path, *overrides)
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert "Traceback" not in out, out[-3000:]
    assert expected in out, out[-3000:]
    if expected.startswith(("config error", "checkpoint error", "data error")):
        assert p.returncode == 2
        info = ("occ-exp run dir", "Writing")  # progress lines; a plain HF folder's "loading it unverified" note
        lines = [l for l in p.stderr.splitlines()
                 if l.strip() and not l.startswith(info) and not l.endswith("loading it unverified")]
        assert len(lines) == 1, lines  # exactly one message
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    record("bad_input", f"cli_{case}", refused=True, exit_code=p.returncode, traceback=False)
