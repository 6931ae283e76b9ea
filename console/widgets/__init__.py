"""Public widgets, grouped by area: fleet/ (nodes and GPUs) and run/ (stages, calibration, log)."""

from console.widgets.fleet.fleet_table import FleetTable
from console.widgets.key_bar import KeyBar
from console.widgets.line_table import LineTable
from console.widgets.run.calib_panel import CalibPanel
from console.widgets.run.log_tail import LogTail
from console.widgets.run.quality_panel import QualityPanel
from console.widgets.run.stage_table import StageTable

__all__ = ["FleetTable", "StageTable", "CalibPanel", "LogTail", "QualityPanel", "LineTable", "KeyBar"]
