"""radnode plugins: the model contract, the registry and one sub-package per model."""
