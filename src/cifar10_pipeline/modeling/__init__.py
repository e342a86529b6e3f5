"""Model architectures, their registry and inference (torch, transformers).

Importing this package registers the project's model types with the transformers Auto classes, so
``transformers.pipeline("image-classification", model=<saved model dir>)`` works after
``import cifar10_pipeline.modeling``.
"""

from cifar10_pipeline.modeling.model import register_auto_classes

register_auto_classes()
