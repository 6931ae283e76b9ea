"""Layer-streaming, data-parallel calibration: samples, amax snapshot, coverage; modelopt's amax_dict files read."""
