"""The ``asr-onnx`` command line: thin click wrappers over :mod:`asr_onnx` (installed as ``asr_onnx_cli``)."""
