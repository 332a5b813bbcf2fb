"""Pieces both services share: JSON errors, settings from the environment, logs, metrics, money rules."""
