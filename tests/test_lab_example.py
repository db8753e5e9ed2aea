"""The example lab file and the README's lab TOML reference, held to the real loader.

examples/lab.toml must load; every key the README's "Lab TOML reference" table documents must be one
the loader reads (changing it changes the loaded lab), with the default the table states; and every
key the loader reads must be in the table.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

from homelab_disagg import config
from homelab_disagg.config import load_lab
from homelab_disagg.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "lab.toml"
README = ROOT / "README.md"


def _reference_rows() -> list[dict]:
    """Rows of the README table under '### Lab TOML reference': section, key, default, what."""
    lines = README.read_text().splitlines()
    start = lines.index("### Lab TOML reference")
    rows, in_table = [], False
    for line in lines[start + 1:]:
        if not line.startswith("|"):
            if in_table:
                break
            continue
        in_table = True
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in ("section", "---"):
            continue
        # `[[decode]]` -> decode; `"f16"` -> "f16" (a TOML literal); required / none stay words
        rows.append({"section": cells[0].strip("`[]"), "key": cells[1].strip("`"),
                     "default": cells[2].strip("`"), "what": cells[3]})
    return rows


ROWS = _reference_rows()
ROW_IDS = [f"{r['section']}.{r['key']}" for r in ROWS]


def _dumps(raw: dict) -> str:
    """TOML for the shapes a lab file has: tables and arrays of tables of scalars."""
    def scalar(v):
        return "true" if v is True else "false" if v is False else repr(v) if isinstance(v, (int, float)) else json.dumps(v)

    out = []
    for name, value in raw.items():
        tables = value if isinstance(value, list) else [value]
        for table in tables:
            out.append(f"[[{name}]]" if isinstance(value, list) else f"[{name}]")
            out += [f"{k} = {scalar(v)}" for k, v in table.items()]
    return "\n".join(out) + "\n"


def _load(raw: dict, tmp_path: Path) -> config.LabConfig:
    path = tmp_path / "lab.toml"
    path.write_text(_dumps(raw))
    return load_lab(path)


def _example_raw() -> dict:
    return tomllib.loads(EXAMPLE.read_text())


def _first_table(raw: dict, section: str) -> dict:
    value = raw[section]
    return value[0] if isinstance(value, list) else value


def _other_value(value, what: str):
    """A valid value for the key that differs from `value`."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if value.startswith("tcp://"):
        host, port = value.rsplit(":", 1)
        return f"{host}:{int(port) + 100}"
    choices = re.findall(r"`([^`]+)`", what)
    if value in choices:
        return next(c for c in choices if c != value)
    return value + "-other"


def test_example_loads_through_the_real_loader():
    lab = load_lab(EXAMPLE)
    assert lab.model_path == Path("/var/lib/homelab-disagg/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert [(p.name, p.control_addr) for p in lab.prefill] == [("gpu0", "tcp://192.168.1.10:5550")]
    assert [d.name for d in lab.decode] == ["r730-node0", "r730-node1"]
    assert lab.decode[1].kv_addr == "tcp://192.168.1.20:5563"
    assert (lab.architecture, lab.codec, lab.layer_streaming) == ("disaggregated", "f16", True)
    assert (lab.http_host, lab.http_port, lab.request_timeout_s) == ("0.0.0.0", 8000, 120.0)
    assert lab.prefill_failover is True and lab.first_token_from_prefill is False


def test_reference_table_is_found():
    assert len(ROWS) >= 10, "README's '### Lab TOML reference' table has fewer rows than the loader has keys"


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_example_sets_every_documented_key(row):
    assert row["key"] in _first_table(_example_raw(), row["section"]), f"examples/lab.toml does not set {row['key']}"


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_every_documented_key_is_read_by_the_loader(row, tmp_path):
    raw = _example_raw()
    table = _first_table(raw, row["section"])
    before = _load(raw, tmp_path)
    table[row["key"]] = _other_value(table[row["key"]], row["what"])
    assert _load(raw, tmp_path) != before, f"changing [{row['section']}] {row['key']} changed nothing the loader returned"


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_documented_default_is_the_loaders(row, tmp_path):
    raw = _example_raw()
    table = _first_table(raw, row["section"])
    del table[row["key"]]
    if row["default"] == "required":
        with pytest.raises(ConfigError, match=re.escape(row["key"])):
            _load(raw, tmp_path)
        return
    without = _load(raw, tmp_path)
    if row["default"] == "none":
        return  # nothing to write in TOML; loading without it is the check
    table[row["key"]] = tomllib.loads(f"v = {row['default']}")["v"]
    assert _load(raw, tmp_path) == without, f"README's default for [{row['section']}] {row['key']} is not the loader's"


class _Recording(dict):
    """A TOML table that notes every key the loader asks for."""

    def __init__(self, section: str, table: dict, seen: set):
        super().__init__(table)
        self._section, self._seen = section, seen

    def _note(self, key):
        self._seen.add((self._section, key))

    def get(self, key, default=None):
        self._note(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self._note(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self._note(key)
        return super().__contains__(key)

    def items(self):
        for key in self:
            self._note(key)
        return super().items()


def test_every_key_the_loader_reads_is_documented(monkeypatch):
    seen: set = set()
    real_loads = tomllib.loads

    def recording_loads(text):
        raw = real_loads(text)
        return {name: [_Recording(name, t, seen) for t in value] if isinstance(value, list) else _Recording(name, value, seen)
                for name, value in raw.items()}

    monkeypatch.setattr(config.tomllib, "loads", recording_loads)
    load_lab(EXAMPLE)
    documented = {(r["section"], r["key"]) for r in ROWS}
    assert seen - documented == set(), "keys the loader reads that README's lab TOML reference does not list"
