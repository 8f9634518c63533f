"""The pipeline's stages, one module each, pure: inputs -> ``StageOutput`` (no Prefect, no MLflow).

``base`` (stage directories, done markers, ``StageOutput`` and the ``Logged`` declarations),
``data`` (materialise + the data gate), ``pretrain``, ``init_from``, ``search``, ``finetune``,
``evaluate`` (calibration, metrics, plots, behaviour), ``register`` (run key, version tags, the
champion decision). ``flows.pipeline`` wires them into Prefect flows and
``flows.tracking.runs.log_stage`` records what each declares.
"""
