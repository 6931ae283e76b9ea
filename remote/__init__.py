"""Where a stage runs: hosts, SSH, the SSH and torchrun launchers, telemetry. Never imports textual."""
