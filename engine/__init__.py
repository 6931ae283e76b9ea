"""quantdeck's engine: what a run is and does. Never imports textual, paramiko or remote."""

__version__ = "0.1.0"
