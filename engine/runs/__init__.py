"""Runs: the recipe, the plan, the run directory and store, the runner, its workers and launchers, the views."""
