"""Prefect flows, DVC and MLflow plumbing around the ``udpdiff`` library (``python -m flows``)."""

# Prefect's ephemeral API server (a stage run outside `python -m flows repro/run`) gets 20 s by
# default to come up; creating a fresh PREFECT_HOME's database takes about that on 2 busy CPU cores,
# so a stage would fail before it started. The local server of a job gets the same allowance.
PREFECT_SERVER_START_TIMEOUT_S = 120
