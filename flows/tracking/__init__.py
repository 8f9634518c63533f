"""Everything that talks to MLflow: ``runs`` (the store, the pipeline's and the stages' runs,
``log_stage``), ``callbacks`` (engine and Optuna callbacks that stream to it) and ``registry``
(versions, aliases, the champion gate's recording)."""
