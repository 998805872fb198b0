"""Metrics shared by several stages (calibration metrics: ECE, NLL, Brier, reliability bins)."""
