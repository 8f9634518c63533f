"""Evaluation: metrics, checkpoint evaluation, calibration, behavioural tests, explanations, plots and
HTML reports."""
