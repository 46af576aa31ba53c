"""One module per DVC stage (``udpdiff.stages.<stage>.run(params, paths) -> StepResult``), so a
stage's dvc.yaml ``deps`` are exactly the modules it imports and its ``params`` the keys it reads
(``tests/test_dvc_graph.py`` derives both and compares them with dvc.yaml). Nothing here knows
about Prefect, DVC or MLflow."""

STAGES = ("data", "validate", "encode", "autoencoder", "latents", "train", "sample", "evaluate", "report")
