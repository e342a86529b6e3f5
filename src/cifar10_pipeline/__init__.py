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
SPLIT_SIZES = {"train": 50_000, "test": 10_000}

__version__ = "0.1.0"
