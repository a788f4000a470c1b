"""The training loop every arm shares, packed training, schedules, pixel baselines, source pretraining."""
