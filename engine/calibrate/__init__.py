"""Layer-streaming, data-parallel calibration: samples, amax snapshot, coverage."""
