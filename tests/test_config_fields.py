"""Every field of every config schema (src/occ_exp/config.py) is read by the code, or is listed in
RESERVED with the open issue that will read it: a key nothing reads is a setting that silently does
nothing.

"Read" means the field's name appears as an attribute (`.name`), an item (`["name"]`) or a getattr
string in src/occ_exp, scripts/ or a conf/ interpolation, outside config.py (validating a value is
not using it). A name that several schema fields share (`seed`, `lr`, `batch_size`, ...) must be
read through its own section: `data.seed`, or a handle for it (a variable assigned from `.data`,
`data_cfg`, or one of HANDLES below), so `cfg.seed` does not count for `data.seed`.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections import Counter
from functools import lru_cache

import pytest

from occ_exp import config as config_module
from occ_exp.config import Config
from tests.conftest import CONF, ROOT

# dotted key -> why it is in the schema although nothing reads it yet
RESERVED = {
    # Issue 13 (fidelity: full DAPO) implements DAPO's dynamic sampling on another branch; the key
    # stays (conf/algorithm/dapo.yaml sets it). Delete this line when that lands.
    "algorithm.dynamic_sampling": "issue 13: DAPO dynamic sampling (drop groups whose rewards are all equal), not implemented yet",
}


def schema_fields(cls=Config, prefix: str = "") -> dict[str, str]:
    """dotted key -> field name, for every leaf field of the schema and its nested dataclasses."""
    out, hints = {}, typing.get_type_hints(cls, vars(config_module))
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        out[key] = f.name
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(schema_fields(hints[f.name], key + "."))
    return out


# Section -> the other names the code reads that section's config through (a function parameter or
# an attribute), for the field names several sections share.
HANDLES = {"optimizer": {"opt_cfg"}, "eval": {"c", "cfg"}, "logger": {"cfg"}, "rollout": {"cfg"}}


@lru_cache(maxsize=1)
def code_text() -> str:
    files = [p for p in (ROOT / "src" / "occ_exp").rglob("*.py") if p.name != "config.py" or p.parent.name != "occ_exp"]
    files += list((ROOT / "scripts").rglob("*.py")) + list(CONF.rglob("*.yaml"))
    return "\n".join(p.read_text(encoding="utf-8") for p in files)


@lru_cache(maxsize=1)
def shared_names() -> frozenset[str]:
    counts = Counter(schema_fields().values())
    return frozenset(name for name, n in counts.items() if n > 1)


def is_read(name: str, section: str | None = None) -> bool:
    """`name` is read anywhere; with `section`, through that section or one of its handles."""
    n, text = re.escape(name), code_text()
    if section is None:
        return re.search(rf"\.{n}\b|\[\s*[\"']{n}[\"']\s*\]|getattr\([^,()]+,\s*[\"']{n}[\"']", text) is not None
    alternatives = "|".join(map(re.escape, sorted(handles(section))))
    return re.search(rf"\b(?:{alternatives})(?:\.{n}\b|\[\s*[\"']{n}[\"'])", text) is not None


@lru_cache(maxsize=None)
def handles(section: str) -> frozenset[str]:
    """The names a section's config is read through: itself, `<section>_cfg`, HANDLES, and any
    variable assigned from `<something>.<section>`."""
    assigned = re.findall(rf"\b(\w+)\s*=\s*[\w.\[\]]*\.{section}\b(?![.\w(])", code_text())
    return frozenset({section, f"{section}_cfg", *HANDLES.get(section, ()), *assigned})


def field_is_read(key: str, name: str) -> bool:
    section = key.split(".")[-2] if "." in key else None
    return is_read(name, section if name in shared_names() else None)


def test_schema_walk_finds_nested_fields():
    keys = schema_fields()
    assert {"model.arch.hidden_size", "model.warmstart.flaw_rate", "algorithm.clip_high", "paths.data_dir"} <= set(keys)
    assert len(keys) > 120


def test_the_check_can_tell_read_from_unread():
    assert is_read("flaw_rate") and is_read("clip_high")
    assert not is_read("no_such_config_field_anywhere")
    # a shared name counts only through its own section: `cfg.seed` (the run's seed) is no read of data.seed
    assert "seed" in shared_names() and is_read("seed")
    assert is_read("seed", "warmstart") and not is_read("seed", "no_such_section")


def test_every_schema_field_is_read_or_reserved():
    unread = sorted(key for key, name in schema_fields().items() if key not in RESERVED and not field_is_read(key, name))
    assert not unread, (f"config fields nothing in src/ or scripts/ reads: {unread}. Read them, remove them from "
                        "config.py and conf/, or add them to RESERVED in this file with the issue that needs them")


@pytest.mark.parametrize("key", sorted(RESERVED))
def test_reserved_fields_are_schema_fields_still_unread(key):
    fields = schema_fields()
    assert key in fields, f"RESERVED lists {key}, which is not a config field: remove the line"
    assert not field_is_read(key, fields[key]), f"{key} is read now: remove it from RESERVED in tests/test_config_fields.py"

