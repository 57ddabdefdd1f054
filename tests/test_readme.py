"""The README and docs/ agree with the code: the config-group table and every `key | default` table
match the composed config, the layout map lists every module, links resolve, and CI runs the
README's own set-up and test commands."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import CONF, ROOT, compose_cfg

README = ROOT / "README.md"
DOCS = ROOT / "docs"
PACKAGE = ROOT / "src" / "occ_exp"
# Options a group has without a file in conf/<group>/ (Hydra's own).
BUILTIN_OPTIONS = {"hydra/launcher": {"basic"}}
# Links to files that are announced but not written yet (they may exist or not).
PENDING_LINKS = {"results/FINDINGS.md"}
PLANNED = "(planned)"


def _text(path: Path = README) -> str:
    return path.read_text(encoding="utf-8")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def tables(text: str, header: list[str]) -> list[list[list[str]]]:
    """Every markdown table whose header starts with `header`: a list of tables, each a list of rows."""
    found, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and _cells(line)[: len(header)] == header:
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append(_cells(row))
            found.append(rows)
    return found


def ticked(cell: str) -> list[str]:
    """The `backticked` names of a cell, ignoring any (parenthesised remark)."""
    return re.findall(r"`([^`]+)`", re.sub(r"\([^()]*\)", "", cell))


def parse_value(s: str):
    s = s.strip()
    lowered = {"null": None, "true": True, "false": False}
    if s in lowered:
        return lowered[s]
    for kind in (int, float):
        try:
            return kind(s)
        except ValueError:
            pass
    return s


def config_groups() -> set[str]:
    """Every config group: each folder under conf/ that holds YAML files (e.g. `model`, `hydra/launcher`)."""
    return {p.parent.relative_to(CONF).as_posix() for p in CONF.rglob("*.yaml") if p.parent != CONF}


def group_options(group: str) -> set[str]:
    return {p.stem for p in (CONF / group).glob("*.yaml")} | BUILTIN_OPTIONS.get(group, set())


def test_group_table_matches_the_composed_config():
    found = tables(_text(), ["group", "default", "choices"])
    assert len(found) == 1, "README.md needs exactly one `| group | default | choices |` table"
    rows = {ticked(r[0])[0]: r for r in found[0]}
    assert set(rows) == config_groups(), (
        f"README's group table lists {sorted(rows)}; conf/ has {sorted(config_groups())}: add or remove rows")
    train = compose_cfg(return_hydra_config=True).hydra.runtime.choices
    evaluate = compose_cfg(config_name="evaluate", return_hydra_config=True).hydra.runtime.choices
    for group, (_, default_cell, choices_cell) in rows.items():
        default = ticked(default_cell)[0]
        actual = train.get(group)
        assert parse_value(default) == actual, f"README says {group} defaults to {default!r}; conf/config.yaml: {actual!r}"
        said = re.search(r"evaluate:\s*`([^`]+)`", default_cell)
        if said:
            assert parse_value(said.group(1)) == evaluate.get(group), (
                f"README says evaluate's {group} is {said.group(1)!r}; conf/evaluate.yaml: {evaluate.get(group)!r}")
        elif group in evaluate:
            assert evaluate[group] == actual, (
                f"conf/evaluate.yaml picks {group}={evaluate[group]}: add (evaluate: `{evaluate[group]}`) to its default cell")
        choices = ticked(choices_cell)
        assert len(choices) == len(set(choices)), f"{group}: a choice is listed twice: {choices}"
        assert set(choices) == group_options(group), (
            f"README lists {group} choices {sorted(choices)}; conf/{group}/ has {sorted(group_options(group))}")


def _key_default_rows():
    cfg = compose_cfg()
    for page in [README, *sorted(DOCS.glob("*.md"))]:
        for table in tables(_text(page), ["key", "default"]):
            for row in table:
                keys, values = ticked(row[0]), [v.strip() for v in row[1].split(",")]
                assert len(keys) == len(values), f"{page.name}: {row[0]} has {len(keys)} keys but {len(values)} defaults"
                for key, value in zip(keys, values):
                    yield page.name, key, value, OmegaConf.select(cfg, key, default="<missing>")


def test_key_default_tables_match_the_composed_config():
    rows = list(_key_default_rows())
    assert len(rows) >= 20, "the docs' `| key | default |` tables were not found"
    wrong = [f"{page}: {key} = {value!r}, config: {actual!r}"
             for page, key, value, actual in rows if parse_value(value) != actual]
    assert not wrong, "defaults in the docs differ from conf/:\n" + "\n".join(wrong)


def layout_map() -> dict[str, str]:
    """module path (relative to src/occ_exp) -> its description, from the README's Layout block."""
    text = _text()
    section = text[text.index("\n## Layout"):]
    block = section[section.index("```") + 3:]
    block = block[: block.index("```")]
    entries: dict[str, str] = {}
    for line in block.splitlines():
        m = re.match(r"^  (\S+\.py)\s+(.*)$", line)
        if m:
            assert m.group(1) not in entries, f"the layout map lists {m.group(1)} twice"
            entries[m.group(1)] = m.group(2)
    return entries


def package_modules() -> set[str]:
    """Every module of src/occ_exp (empty __init__.py files are not modules worth a line)."""
    return {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
            if "__pycache__" not in p.parts and not (p.name == "__init__.py" and not p.read_text().strip())}


def test_layout_map_lists_every_module():
    entries, modules = layout_map(), package_modules()
    assert len(entries) >= 30
    missing = sorted(modules - set(entries))
    assert not missing, f"README's layout map has no line for {missing}: add one line each (path, what it is)"
    stale = sorted(m for m, what in entries.items() if m not in modules and PLANNED not in what)
    assert not stale, f"README's layout map lists {stale}, which do not exist: remove or rename the lines"
    landed = sorted(m for m, what in entries.items() if m in modules and PLANNED in what)
    assert not landed, f"{landed} exist now: drop {PLANNED} from their lines in README's layout map"


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(m) for m in re.findall(r"^#+ (.+)$", _text(path), flags=re.M)}


def _relative_links(page: Path):
    for target in LINK.findall(_text(page)):
        if not re.match(r"^[a-z]+:", target):
            yield target


@pytest.mark.parametrize("page", [README, *sorted(DOCS.glob("*.md"))], ids=lambda p: p.name)
def test_links_resolve(page):
    broken = []
    for target in _relative_links(page):
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if path.relative_to(ROOT.resolve()).as_posix() in PENDING_LINKS:
            continue
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading with that anchor in {path.name}")
    assert not broken, f"{page.name}: broken links:\n" + "\n".join(broken)


def test_readme_links_every_docs_page():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in _relative_links(README) if t.startswith("docs/")}
    pages = {p.resolve() for p in DOCS.glob("*.md")}
    assert len(pages) >= 6
    assert not pages - linked, f"README links no {sorted(p.name for p in pages - linked)}"


def test_ci_runs_the_readme_commands():
    """.ci/run's set-up and test commands are the first two commands of the README."""
    ci = _text(ROOT / ".ci" / "run").splitlines()
    commands = []
    for label in ("set-up command", "test command"):
        i = next(i for i, line in enumerate(ci) if line.startswith("# --- README:") and label in line)
        commands.append(ci[i + 1].strip())
    first_block = _text().split("```bash\n", 1)[1].split("```", 1)[0]
    readme = [line.split("#", 1)[0].strip() for line in first_block.splitlines()]
    assert readme[:2] == commands, f"README's first commands {readme[:2]} differ from .ci/run's {commands}"
