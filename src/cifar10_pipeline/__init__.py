"""A reproducible DVC pipeline that trains, evaluates, documents and serves a CIFAR-10 classifier."""

CLASS_NAMES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SHAPE = (32, 32, 3)
# The config.json key of the softmax temperature fitted after training (modeling.inference reads and sets
# it), the same for every architecture. Not "temperature": transformers 5 refuses to save a config holding a
# generation parameter of that name unless its class declares the field (ViTConfig, ...).
CALIBRATION_TEMPERATURE = "calibration_temperature"

__version__ = "0.1.0"
