#!/usr/bin/env python
"""Fetch the paper's six math benchmarks and DAPO-Math-17k from their public Hugging Face data set
repositories into one folder of JSONL files, the layout occ-exp reads (`paths.data_dir`):

    python scripts/fetch_data.py --data-dir data                        # all seven files
    python scripts/fetch_data.py --data-dir data --only aime24,math500  # some of them
    python scripts/fetch_data.py --data-dir data --verify               # check files already there
    python scripts/fetch_data.py --data-dir data --only benchmarks      # the six benchmarks only

Every file holds one JSON object per line, `{"problem": ..., "answer": ...}`:

* benchmarks: the problem text followed by "\\nPlease reason step by step, and put your final
  answer within \\boxed{}." and the reference final answer (OlympiadBench's answer list joined
  with ", "; integral numbers written as integers);
* dapo_math: the one user message of DAPO-Math-17k's chat-format `prompt`, which carries DAPO's
  own instruction ("... The last line of your response should be of the form Answer: $Answer
  ..."), and `reward_model.ground_truth`; the data set repeats each problem about 100 times
  (1.79 M rows), so rows are deduplicated by problem text (first kept).

Checks: each converted file must have the manifest's row count (an error otherwise). Its sha256
is compared with the manifest's, the checksum of the reference copy the project's numbers were
computed on (the FiRe-OPD data/ files the tests use); a difference is reported as a warning,
since the hub's text may differ from that copy in whitespace or LaTeX spelling, and --strict
makes it an error. DAPO-Math-17k has no reference copy: its row count is checked.

The files are read from each data set's `refs/convert/parquet` branch (the hub's own parquet
export, one layout for every data set: <config>/<split>/*.parquet), with huggingface_hub
(installed with occ-exp) and pyarrow (`pip install 'occ-exp[data]'`, used only here).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
try:
    import occ_exp  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO / "src"))

from occ_exp.data.benchmarks import DataError, dedup, load_problems, row_to_problem  # noqa: E402

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
PARQUET_REVISION = "refs/convert/parquet"


@dataclass(frozen=True)
class Source:
    repo: str  # Hugging Face data set id
    config: str
    split: str
    rows: int  # rows of the converted file
    sha256: str | None  # of the reference copy of the converted file (None: no reference copy)
    kind: str = "benchmark"  # "benchmark" or "dapo": which conversion


MANIFEST: dict[str, Source] = {
    "aime24": Source("HuggingFaceH4/aime_2024", "default", "train", 30,
                     "a3c49569f3d7125aaf4eea5764bd1b868af534ae3aff6aad0843a7da58fe46b8"),
    "aime25": Source("yentinglin/aime_2025", "default", "train", 30,
                     "6012af2a112f5e26d91f1b0cc644b5dde6399173b8b648aec2e6b9899877a2db"),
    "amc23": Source("math-ai/amc23", "default", "test", 40,
                    "b443425b035d98fec3da4de7e347ac43cebcf7b721e96ba8bf9e0120d24dd61d"),
    "math500": Source("HuggingFaceH4/MATH-500", "default", "test", 500,
                      "5b126695a919f8fb40edffaf2e748ae08f7fb6ce0721211671c760b4f0b7c5de"),
    "minerva_math": Source("math-ai/minervamath", "default", "test", 272,
                           "ff6e07ac93af4e43885fe7710ded51c8db04543d627326b855d903075d59e872"),
    "olympiadbench": Source("Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train", 674,
                            "6c3c658145c21dd76f70eef1456dc5de9bbb38342f2ffdc4a803d8e6e3005ecc"),
    "dapo_math": Source("BytedTsinghua-SIA/DAPO-Math-17k", "default", "train", 17398, None, kind="dapo"),
}


class FetchError(RuntimeError):
    """One line saying what failed and what to do."""


# -- conversion (pure functions, tested on local rows) ------------------------------------------
def answer_text(value) -> str:
    """A reference answer as text: lists joined with ", ", integral floats as integers."""
    if isinstance(value, (list, tuple)):
        return ", ".join(answer_text(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _pick(row: dict, keys: tuple[str, ...], what: str, where: str):
    for key in keys:
        if row.get(key) not in (None, "", []):
            return row[key]
    raise FetchError(f"{where}: no {what} (looked for {', '.join(keys)}; columns are {sorted(row)}); "
                     "the data set's schema changed: update MANIFEST in scripts/fetch_data.py")


def convert_benchmark(rows: list[dict], where: str) -> list[dict]:
    out = []
    for i, row in enumerate(rows):
        problem = _pick(row, ("problem", "question"), "problem text", f"{where} row {i}")
        answer = _pick(row, ("answer", "final_answer"), "answer", f"{where} row {i}")
        # the text as the hub has it (no stripping): the reference copies keep stray spaces too
        out.append({"problem": f"{problem}\n{INSTRUCTION}", "answer": answer_text(answer)})
    return out


def convert_dapo(rows: list[dict], where: str) -> list[dict]:
    """DAPO-Math-17k rows (chat-format prompt, reward_model.ground_truth) -> deduplicated rows; the
    same reading as occ_exp's loader, so a raw export and a converted file give the same problems."""
    try:
        problems = [row_to_problem(r, f"{where} row {i}") for i, r in enumerate(rows)]
    except DataError as e:
        raise FetchError(f"{e}; the data set's schema changed: update scripts/fetch_data.py") from None
    return [{"problem": p.prompt, "answer": p.answer} for p in dedup(problems)]


def convert(name: str, rows: list[dict]) -> list[dict]:
    src = MANIFEST[name]
    where = f"{src.repo} ({src.config}/{src.split})"
    return convert_dapo(rows, where) if src.kind == "dapo" else convert_benchmark(rows, where)


def write_jsonl(rows: list[dict], path: Path) -> str:
    """Write atomically, one `json.dumps` object per line (the reference copies' format); returns the sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()


def check(name: str, n_rows: int, sha256: str, strict: bool) -> str:
    """Compare a converted file with the manifest; returns the status line, raises on a mismatch."""
    src = MANIFEST[name]
    if n_rows != src.rows:
        raise FetchError(f"{name}: {n_rows} rows, expected {src.rows}; the upstream data set changed: "
                         "do not compare results with the paper's until this is resolved")
    if src.sha256 is None:
        return f"{name}: {n_rows} rows (no reference checksum), sha256 {sha256}"
    if sha256 == src.sha256:
        return f"{name}: {n_rows} rows, sha256 matches the reference copy"
    msg = (f"{name}: {n_rows} rows, but sha256 {sha256[:12]}... differs from the reference copy's "
           f"{src.sha256[:12]}... (the problem or answer text differs)")
    if strict:
        raise FetchError(msg)
    return "warning: " + msg


# -- the hub ------------------------------------------------------------------------------------
def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _hub_error(e: Exception, repo: str) -> FetchError:
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    if isinstance(e, HfHubHTTPError) and not isinstance(e, LocalEntryNotFoundError):
        return FetchError(f"the Hugging Face Hub refused {repo}: {str(e).splitlines()[0]}")
    return FetchError(f"cannot reach the Hugging Face Hub at {_endpoint()} ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else 'no details'}); check the network (HF_ENDPOINT, "
                      "proxy), or copy the JSONL files into the data dir by hand and run with --verify")


def require_hub(repo: str) -> None:
    """One cheap request first, so being offline is one clear line, not a traceback."""
    from huggingface_hub import HfApi

    try:
        HfApi().dataset_info(repo)
    except Exception as e:  # noqa: BLE001 - every failure becomes one line
        raise _hub_error(e, repo) from None


def require_pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise FetchError("pyarrow is needed to read the hub's parquet files: pip install 'occ-exp[data]' "
                         "(or pip install pyarrow)") from None
    return pq


def download_rows(src: Source) -> list[dict]:
    from huggingface_hub import snapshot_download

    pq = require_pyarrow()
    pattern = f"{src.config}/{src.split}/*.parquet"
    try:
        folder = snapshot_download(src.repo, repo_type="dataset", revision=PARQUET_REVISION, allow_patterns=[pattern])
    except Exception as e:  # noqa: BLE001
        raise _hub_error(e, src.repo) from None
    files = sorted(glob.glob(os.path.join(folder, pattern)))
    if not files:
        raise FetchError(f"{src.repo}: no files match {pattern} on {PARQUET_REVISION}; the data set's layout "
                         "changed: update MANIFEST in scripts/fetch_data.py")
    return [row for f in files for row in pq.read_table(f).to_pylist()]


def fetch(name: str, data_dir: Path, strict: bool = False) -> str:
    src = MANIFEST[name]
    rows = convert(name, download_rows(src))
    sha = write_jsonl(rows, data_dir / f"{name}.jsonl")
    return check(name, len(rows), sha, strict)


def verify(name: str, data_dir: Path, strict: bool = False) -> str:
    """Check a file already in data_dir: readable by occ_exp's loader, row count, checksum."""
    path = data_dir / f"{name}.jsonl"
    try:
        n = len(load_problems(path))
    except DataError as e:
        raise FetchError(str(e)) from None
    return check(name, n, hashlib.sha256(path.read_bytes()).hexdigest(), strict)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default="data", help="folder for the JSONL files (paths.data_dir); default: data")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(MANIFEST)} "
                    "('benchmarks': the six benchmarks)")
    ap.add_argument("--verify", action="store_true", help="only check the files already in --data-dir")
    ap.add_argument("--strict", action="store_true", help="a checksum that differs from the reference copy is an error")
    args = ap.parse_args(argv)
    groups = {"benchmarks": [n for n, s in MANIFEST.items() if s.kind == "benchmark"]}
    names = [m for n in args.only.split(",") if n for m in groups.get(n, [n])] or list(MANIFEST)
    unknown = [n for n in names if n not in MANIFEST]
    if unknown:
        print(f"error: unknown data set(s) {unknown}; choose from {list(MANIFEST)}", file=sys.stderr)
        return 2
    data_dir = Path(args.data_dir)
    failed = 0
    try:
        if not args.verify:
            require_hub(MANIFEST[names[0]].repo)
            require_pyarrow()
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name in names:
        try:
            line = verify(name, data_dir, args.strict) if args.verify else fetch(name, data_dir, args.strict)
            print(line if args.verify else f"{line} -> {data_dir / (name + '.jsonl')}")
        except FetchError as e:
            failed += 1
            print(f"error: {e}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
