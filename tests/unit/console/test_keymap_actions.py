from console.actions import ACTIONS
from console.keymap import default_keymap, load_keymap, to_bindings


def test_issue_keys():
    keys = {kb.action: kb.key for kb in default_keymap()}
    assert keys == {"resume": "r", "export_only": "e", "validate_only": "v", "cancel": "c", "new_run": "n",
                    "history": "h", "logs": "l", "help": "question_mark", "quit": "q"}
    assert all(b.action in ACTIONS for b in to_bindings(default_keymap()))


def test_user_keymap_overrides_and_ignores_unknown(tmp_path):
    p = tmp_path / "keymap.toml"
    p.write_text('[keys]\nresume = "R"\nnot_an_action = "x"\n')
    keys = {kb.action: kb.key for kb in load_keymap(p)}
    assert keys["resume"] == "R" and "not_an_action" not in keys


def test_broken_keymap_falls_back_to_defaults(tmp_path):
    p = tmp_path / "keymap.toml"
    p.write_text("[keys\n")
    assert {kb.key for kb in load_keymap(p)} == {kb.key for kb in default_keymap()}
