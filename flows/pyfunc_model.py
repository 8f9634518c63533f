"""Models-from-code entry for the MLflow pyfunc (``mlflow.pyfunc.log_model(python_model=<this file>)``).

MLflow stores this small file with the model and runs it at load time; it builds the model
object from the installed ``flows.serving`` module, so nothing is pickled. The weights are the
``model_dir`` artifact (safetensors + JSON + tokenizer), loaded by ``load_context``.
"""

import mlflow

from flows.serving import SelfattnClassifier

mlflow.models.set_model(SelfattnClassifier())
