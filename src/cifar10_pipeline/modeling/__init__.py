"""Model architectures, their registry and inference (torch, transformers).

Importing this package registers the project's model types with the transformers Auto classes, so
``transformers.pipeline("image-classification", model=<saved model dir>)`` works after
``import cifar10_pipeline.modeling``. ``saved_model_dir(path)`` checks the folder first: transformers takes a
missing folder for a Hub id and answers with a network error; this says how to get a model instead.
"""

from cifar10_pipeline.core.paths import saved_model_dir as saved_model_dir
from cifar10_pipeline.modeling.model import register_auto_classes

register_auto_classes()
