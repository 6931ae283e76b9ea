"""Calibrated export: activation scales from an amax snapshot, sibling fill, modelopt amax_dict import."""
