"""Model tests: architectures, the training loop, inference, behaviour of a model trained on real images."""
