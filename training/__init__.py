"""Model logic of flywheel: FFCV datasets and loaders, the Lightning model, the `fit` entry point run
under torchrun, evaluation, ONNX export and int8 quantization, and the model registry.
Plain torch/Lightning code — never Dagster (only `dagster-pipes` in the training process)."""
