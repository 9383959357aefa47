"""Entry point of the pyfunc generator (MLflow's models-from-code): MLflow runs this file to
rebuild the model when it is loaded or served, instead of unpickling an object."""

from mlflow.models import set_model

from pipeline.tracking.served_model import TextModel

set_model(TextModel())
