"""`n` starts a REAL run from a valid recipe (a weight-only NVFP4 run of a tiny DeepSeek-V3 FP8 checkpoint,
through engine.api): the console, opened with no run at all, attaches to it, shows its stages on the dashboard
and lists it in history — the history opened from the command palette, as an operator who does not remember
the key would. `q` then leaves the console and the run goes on. Its own QUANTDECK_HOME and work dir (the
autouse fixture in tests/conftest.py): the session's killed run and its store are not touched."""

from __future__ import annotations

import json

import pytest
from test_console_actions import SIZE, until

from console.api_backend import ApiBackend
from console.factory import build_app
from console.screens.history import HistoryScreen
from console.screens.new_run import NewRunModal
from console.widgets import StageTable
from engine.api import open_engine
from engine.runs.recipe_toml import write_recipe

pytestmark = pytest.mark.slow  # a real run: ~10-20 s on two loaded cores


def _recipe(tmp_path, ckpt):
    return write_recipe(tmp_path / "recipe.toml", {
        "run": {"workdir": str(tmp_path / "work")}, "source": {"path": str(ckpt)},
        "target": {"format": "nvfp4", "calibrate": False, "layouts": ["modelopt"], "output": str(tmp_path / "out")}})


async def test_new_run_from_a_valid_recipe_is_followed_and_listed(tmp_path, tiny_ckpt):
    ckpt = tiny_ckpt("deepseek-v3", "fp8", layers=2, experts=4, hidden=128, moe_inter=64, mtp=True)
    recipe = _recipe(tmp_path, ckpt)
    eng = open_engine(str(tmp_path / "work"))
    app = build_app(backend=ApiBackend(eng), use_fleet=False, follow_s=0.3)
    run_id = None
    try:
        async with app.run_test(size=SIZE) as pilot:
            # nothing to attach to: the empty state, and `n` is offered
            await until(pilot, lambda: "none attached" in str(app.screen.query_one("#stages-box").border_title),
                        what="the empty state")
            assert app.check_action("new_run", ()) is True
            await pilot.press("n")
            await until(pilot, lambda: isinstance(app.screen, NewRunModal), what="the recipe prompt")
            app.screen.query_one("Input").value = str(recipe)
            await pilot.press("enter")
            await until(pilot, lambda: app.run_view is not None and app.run_id == app.run_view.id, timeout=60,
                        what="the console to attach to the new run")
            run_id = app.run_id
            assert any(run_id in t for t in app.told)  # "New: <run id>", handed to the engine
            table = app.screen.query_one(StageTable)
            await until(pilot, lambda: table.row_count == len(app.run_view.stages) > 0, what="the run's stages")
            assert table.row_keys == [s.name for s in app.run_view.stages] and "convert" in table.row_keys
            assert run_id in str(app.screen.query_one("#stages-box").border_title)
            # history, from the command palette: the new run is listed
            await pilot.press("ctrl+p")
            await pilot.pause(0.3)
            await pilot.press(*"History", "enter")
            await until(pilot, lambda: isinstance(app.screen, HistoryScreen) and app.screen.rows,
                        what="history from the palette")
            assert [r.run_id for r in app.screen.visible_rows()] == [run_id]
            await pilot.press("escape")
            await until(pilot, lambda: not isinstance(app.screen, HistoryScreen), what="the dashboard again")
            await pilot.press("q")
            await until(pilot, lambda: app.return_code is not None, what="q to leave the console")
        assert app.return_code == 0
        assert eng.status(run_id).id == run_id  # the run is the engine's, whatever the console did
        view = eng.status(run_id)
        assert view.driver_alive or view.result in ("RUNNING", "SUCCEEDED"), json.dumps(view.to_json())[:500]
    finally:
        if run_id and eng.status(run_id).driver_alive:
            eng.cancel(run_id)  # never leave a run behind
