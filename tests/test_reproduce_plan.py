"""scripts/reproduce.py's resumed sweeps: the cells left are launched as few multiruns as possible,
so that `--jobs 2` keeps both cores busy when each regime lacks one seed."""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rp():
    spec = importlib.util.spec_from_file_location("reproduce_script", ROOT / "scripts" / "reproduce.py")
    mod = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(mod)
    return mod


def test_regimes_lacking_the_same_seeds_share_one_multirun(rp):
    sw = rp.Sweep("table1", rp.TABLE1_REGIMES, 3)
    plain = [r for r in rp.TABLE1_REGIMES if r not in rp.REGIME_OVERRIDES]
    done = {(sw.label(r, None), s) for r in plain for s in (0, 1)} | {(sw.label("occ_reference", None), 0)}
    got = sw.overrides(done)
    assert got == [["regime=" + ",".join(plain), "seed=2"], ["regime=occ_reference", "seed=1,2"]]
    # every cell left is launched exactly once
    launched = {(sw.label(r, None), int(s)) for o in got for r in o[0].removeprefix("regime=").split(",")
                for s in o[1].removeprefix("seed=").split(",")}
    assert launched == set(sw.cells()) - done


def test_a_swept_value_groups_its_regimes_and_keeps_its_value(rp):
    sw = rp.Sweep("table2", ["policy", "ce"], 3, "regime.coef", [0.03, 0.3])
    done = {(sw.label("policy", 0.03), 0), (sw.label("ce", 0.03), 0), (sw.label("policy", 0.3), 0)}
    assert sw.overrides(done) == [["regime=policy,ce", "seed=1,2", "regime.coef=0.03"],
                                  ["regime=policy", "seed=1,2", "regime.coef=0.3"],
                                  ["regime=ce", "seed=0,1,2", "regime.coef=0.3"]]


def test_regimes_option_limits_the_sweep_to_those_cells(rp, tmp_path, capsys):
    rp.main(["table1", "--plan", "--regimes", "detach,occ", "--seeds", "3", "--sec-per-step", "2",
             "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results")])
    rows = [line.split("|")[1].strip() for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows[1:] == ["detach", "occ λ=1"]


def test_regimes_option_names_an_unknown_regime(rp, tmp_path, capsys):
    with pytest.raises(SystemExit):
        rp.main(["table1", "--plan", "--regimes", "detach,occ_typo", "--runs", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "unknown regime 'occ_typo'" in err and "occ_reference" in err  # what was wrong, and the names to use


def test_summaries_keep_a_missing_value_apart_from_a_nan(rp, tmp_path):
    """The summaries findings reads back: a regime without runs (None) must not come back as a number (nan)."""
    path = tmp_path / "t.json"
    rp.write_json({"none": None, "nan": float("nan"), "inf": float("inf"), "xs": [1.5, None, float("-inf")]}, path)
    got = rp.read_json(path)
    assert got["none"] is None and got["nan"] != got["nan"] and got["inf"] == float("inf")
    assert got["xs"][0] == 1.5 and got["xs"][1] is None and got["xs"][2] == float("-inf")


def test_values_option_limits_the_sweep_to_those_values_in_that_order(rp, tmp_path, capsys):
    """A long Table 2 sweep spread over sessions: run the informative end of the λ grid first."""
    rp.main(["table2", "--plan", "--regimes", "policy,ce", "--values", "3,1", "--sec-per-step", "2",
             "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results")])
    rows = [line.split("|")[1].strip() for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows[1:] == ["policy λ=3", "ce λ=3", "policy λ=1", "ce λ=1"]


def test_values_option_names_a_value_the_table_does_not_sweep(rp, tmp_path, capsys):
    with pytest.raises(SystemExit):
        rp.main(["table2", "--plan", "--values", "3,2", "--runs", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--values: 2" in err and "0.03" in err and "10" in err  # what was wrong, and the values to use


def test_the_report_header_names_the_commits_the_runs_were_made_at(rp, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    for name, lines in {"a": ['{"step": 0, "commit": "aaa1111"}', '{"step": 25, "commit": "bbb2222"}'],
                        "b": ['{"step": 0, "commit": "aaa1111"}'], "c": None}.items():
        (runs / "t1" / name / ".hydra").mkdir(parents=True)
        if lines:
            (runs / "t1" / name / "provenance.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(rp, "RUNS", runs)
    text = rp.header("T", type("A", (), {"command": "python scripts/reproduce.py table1"})(), ["t1"])
    assert "runs made at commit `aaa1111` (2 runs), `bbb2222` (1 run); 1 run from before runs recorded their commit" in text
