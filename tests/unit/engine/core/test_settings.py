"""engine.core.settings: one meaning of true, bad values refused naming the variable, QUANTDECK_FAULTS parsed in one
place, settings() current after a change, and no other module reading a QUANTDECK_/QD_ variable itself."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from engine.core.errors import ExitCode, SettingsError
from engine.core.settings import NAMES, Faults, Settings, fault_spec, settings, table

REPO = Path(__file__).resolve().parents[4]


@pytest.mark.parametrize("raw", ["1", "true", "True", "YES", "on", " on "])
def test_true(raw):
    assert Settings.from_env({"QUANTDECK_FSYNC": raw}).fsync is True


@pytest.mark.parametrize("raw", ["0", "false", "FALSE", "no", "Off"])
def test_false(raw):
    assert Settings.from_env({"QUANTDECK_DIRECT_IO": raw}).direct_io is False


def test_unset_or_empty_takes_the_default():
    for env in ({}, {"QUANTDECK_DIRECT_IO": "", "QUANTDECK_KERNEL_CHUNK": " "}):
        s = Settings.from_env(env)
        assert s == Settings() and s.direct_io is True and s.kernel_chunk == 8 and s.faults == Faults()


def test_values_are_typed():
    s = Settings.from_env({"QUANTDECK_READERS": "3", "QUANTDECK_RANK_TIMEOUT_S": "2.5", "QUANTDECK_KERNELS": " C ",
                           "QUANTDECK_HOME": "/h", "QD_CONVERT_WORKERS": "4"})
    assert (s.readers, s.rank_timeout_s, s.kernels, s.home, s.convert_workers) == (3, 2.5, "c", "/h", 4)
    assert Settings.from_env({"QUANTDECK_LAYER_BUDGET_GB": "15.5"}).layer_budget_gb == 15.5
    assert Settings().layer_budget_gb is None


@pytest.mark.parametrize("var,raw", [("QUANTDECK_FSYNC", "maybe"), ("QUANTDECK_NO_READAHEAD", "2"),
                                     ("QUANTDECK_READERS", "many"), ("QUANTDECK_KERNEL_THREADS", "-1"),
                                     ("QUANTDECK_READERS", "1.5"), ("QD_CONVERT_WORKERS", "0"),
                                     ("QUANTDECK_RANK_TIMEOUT_S", "nan"), ("QUANTDECK_KERNELS", "cuda"),
                                     ("QUANTDECK_FLEET", "live"), ("QUANTDECK_LAYER_BUDGET_GB", "-1"),
                                     ("QUANTDECK_LAYER_BUDGET_GB", "20GB")])
def test_garbage_is_refused_naming_the_variable(var, raw):
    with pytest.raises(SettingsError) as e:
        Settings.from_env({var: raw})
    assert e.value.at == var and var in e.value.one_line() and repr(raw) in e.value.one_line()
    assert e.value.exit_code == ExitCode.USAGE and e.value.hint


def test_faults_parse():
    f = Settings.from_env({"QUANTDECK_FAULTS": "pause_stage=convert, pause_after_units=3,fail_rank=1,"
                                               "item_delay_s=0.25,calibrate_die_after_layer=2,"}).faults
    assert f == Faults(pause_stage="convert", pause_after_units=3, fail_rank=1, item_delay_s=0.25,
                       calibrate_die_after_layer=2)
    assert Settings.from_env({"QUANTDECK_FAULTS": "pause_stage=inspect"}).faults.pause_after_units == 0


@pytest.mark.parametrize("raw", ["pause_stage", "nap=1", "fail_rank=", "fail_rank=one", "item_delay_s=-1",
                                 "pause_after_units=2"])
def test_bad_faults_are_refused(raw):
    with pytest.raises(SettingsError) as e:
        Settings.from_env({"QUANTDECK_FAULTS": raw})
    assert "QUANTDECK_FAULTS" in e.value.one_line()


def test_fault_spec_round_trips_and_checks():
    spec = fault_spec(pause_stage="export", pause_after_units=30)
    assert spec == "pause_stage=export,pause_after_units=30"
    assert Settings.from_env({"QUANTDECK_FAULTS": spec}).faults == Faults(pause_stage="export", pause_after_units=30)
    with pytest.raises(SettingsError):
        fault_spec(pause_units=1)


def test_a_retired_hook_is_refused_with_its_replacement():
    with pytest.raises(SettingsError, match="QUANTDECK_TEST_FAIL_RANK") as e:
        Settings.from_env({"QUANTDECK_TEST_FAIL_RANK": "1"})
    assert "QUANTDECK_FAULTS=fail_rank" in e.value.hint


def test_settings_follow_os_environ(monkeypatch):
    monkeypatch.delenv("QUANTDECK_KERNEL_THREADS", raising=False)
    first = settings()
    assert settings() is first  # unchanged: not parsed again
    monkeypatch.setenv("QUANTDECK_KERNEL_THREADS", "3")
    assert settings().kernel_threads == 3
    monkeypatch.setenv("QUANTDECK_KERNEL_THREADS", "oops")
    with pytest.raises(SettingsError, match="QUANTDECK_KERNEL_THREADS"):
        settings()
    monkeypatch.delenv("QUANTDECK_KERNEL_THREADS")
    assert settings().kernel_threads == 0


def test_the_table_documents_every_variable():
    rows = table().splitlines()[2:]
    assert [r.split("`")[1] for r in rows] == list(NAMES) and len(set(NAMES)) == len(NAMES)
    assert all(len(r.split(" | ")) == 4 and all(c.strip() for c in r.split(" | ")) for r in rows)


# --- no other module reads a QUANTDECK_ / QD_ variable itself ------------------------------------------------------

PREFIXES = ("QUANTDECK_", "QD_")


def _constants(tree: ast.Module) -> dict[str, str]:
    """Module-level `NAME = "..."` strings, and for `NAME = {...: "..."}` its first QUANTDECK_/QD_ value."""
    out = {}
    for node in tree.body:
        if not isinstance(node, ast.Assign):
            continue
        v = node.value
        if isinstance(v, ast.Constant) and isinstance(v.value, str):
            text = v.value
        elif isinstance(v, ast.Dict):
            text = next((t.value for t in v.values if isinstance(t, ast.Constant) and isinstance(t.value, str)
                         and t.value.startswith(PREFIXES)), None)
        else:
            continue
        out.update({t.id: text for t in node.targets if isinstance(t, ast.Name) and text is not None})
    return out


def _is_environ(node: ast.AST, aliases: set[str]) -> bool:
    if isinstance(node, ast.Attribute) and node.attr == "environ":
        return isinstance(node.value, ast.Name) and node.value.id == "os"
    return isinstance(node, ast.Name) and node.id in aliases


def _text(node: ast.AST, consts: dict[str, str], shared: dict[str, str]) -> str:
    """The (leading) text of a variable name given as a literal, f-string, concatenation or constant."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values:
        return _text(node.values[0], consts, shared)
    if isinstance(node, ast.BinOp):
        return _text(node.left, consts, shared)
    if isinstance(node, ast.Name):  # this module's constant, else one imported from another
        return consts.get(node.id, shared.get(node.id, ""))
    if isinstance(node, ast.Subscript):  # CONSTANT_DICT[key]
        return _text(node.value, consts, shared)
    if isinstance(node, ast.Attribute):  # module.NAME
        return shared.get(node.attr, "")
    return ""


def _reads(source: str, shared: dict[str, str] | None = None) -> list[int]:
    """Lines of `source` that read a QUANTDECK_/QD_ variable from os.environ (get, [], in, os.getenv)."""
    tree = ast.parse(source)
    consts = _constants(tree)
    shared = {**(shared or {}), **consts}
    aliases = {"environ"} | {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign) and _is_environ(n.value, set())
                             for t in n.targets if isinstance(t, ast.Name)}
    found = []
    for n in ast.walk(tree):
        key = None
        if isinstance(n, ast.Call) and n.args:
            f = n.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name == "getenv" or (name == "get" and _is_environ(getattr(f, "value", None), aliases)):
                key = n.args[0]
        elif isinstance(n, ast.Subscript) and isinstance(n.ctx, ast.Load) and _is_environ(n.value, aliases):
            key = n.slice
        elif isinstance(n, ast.Compare) and any(isinstance(o, (ast.In, ast.NotIn)) for o in n.ops) and \
                any(_is_environ(c, aliases) for c in n.comparators):
            key = n.left
        if key is not None and _text(key, consts, shared).startswith(PREFIXES):
            found.append(n.lineno)
    return found


def test_the_scanner_finds_reads():
    src = '''import os
from os import environ, getenv
X = "QUANTDECK_X"
env = os.environ
a = os.environ.get("QUANTDECK_A")
b = os.environ["QD_B"]
c = "QUANTDECK_C" in os.environ
d = env.get(f"QUANTDECK_{k}")
e = os.getenv(X)
f = environ.get(mod.Y)
FALLBACKS = {"a": "QUANTDECK_F"}
i = os.environ.get(FALLBACKS[k])
g = getenv("QD_G")
os.environ["QUANTDECK_W"] = "1"
os.environ.setdefault("QUANTDECK_W", "1")
h = os.environ.get("HOME")
'''
    assert sorted(_reads(src, {"Y": "QUANTDECK_Y"})) == [5, 6, 7, 8, 9, 10, 12, 13]


def test_only_settings_reads_quantdeck_variables():
    files = [p for d in ("engine", "console", "remote") for p in sorted((REPO / d).rglob("*.py"))
             if p != REPO / "engine" / "core" / "settings.py"]
    trees = {p: p.read_text() for p in files}
    shared: dict[str, str] = {}
    for text in trees.values():
        shared.update(_constants(ast.parse(text)))
    bad = [f"{p.relative_to(REPO)}:{line}" for p, text in trees.items() for line in _reads(text, shared)]
    assert not bad, f"read these through engine.core.settings: {bad}"


def test_infinite_seconds_and_a_fault_key_given_twice_are_refused(monkeypatch):
    from engine.core.errors import SettingsError
    from engine.core.settings import settings

    monkeypatch.setenv("QUANTDECK_RANK_TIMEOUT_S", "inf")
    with pytest.raises(SettingsError, match="QUANTDECK_RANK_TIMEOUT_S"):
        settings()
    monkeypatch.delenv("QUANTDECK_RANK_TIMEOUT_S")
    monkeypatch.setenv("QUANTDECK_FAULTS", "fail_rank=1,fail_rank=2")
    with pytest.raises(SettingsError, match="fail_rank given twice"):
        settings()
