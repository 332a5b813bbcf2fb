"""What both services share: JSON errors, settings from env, logs, metrics, money rules."""
