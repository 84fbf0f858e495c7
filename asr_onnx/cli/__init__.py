"""The ``asr-onnx`` command line: thin click wrappers over :mod:`asr_onnx`."""
