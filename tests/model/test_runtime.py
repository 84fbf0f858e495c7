"""Provider choice and IO binding, on the CPU (CI has no GPU)."""

import warnings

import numpy as np
import onnxruntime as ort
import pytest
from zoo import conv_net, random_inputs

import asr_onnx.model.session as runtime
from asr_onnx.errors import AsrError


def test_cpu_and_auto_fall_back_to_cpu_without_cuda():
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    assert runtime.providers("cpu") == ["CPUExecutionProvider"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no GPU visible here: auto is silent
        if not runtime._cuda_device_visible():
            assert runtime.providers("auto") == ["CPUExecutionProvider"]


def test_cuda_without_the_provider_is_a_clear_error():
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(AsrError, match="no CUDAExecutionProvider.*onnxruntime-gpu"):
        runtime.providers("cuda")


def test_auto_warns_when_a_gpu_is_visible_but_the_provider_is_not(monkeypatch):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    monkeypatch.setattr(runtime, "_cuda_device_visible", lambda: True)
    with pytest.warns(UserWarning, match="using the CPU"):
        assert runtime.providers("auto") == ["CPUExecutionProvider"]


def test_unknown_device():
    with pytest.raises(AsrError, match="unknown device"):
        runtime.providers("tpu")


def test_io_binding_runner_matches_plain_run():
    session = runtime.make_session(conv_net(bn=True), "cpu")
    feed = {"input": random_inputs(5)}
    plain = runtime.runner(session, io_binding=False)(["logits"], feed)[0]
    bound = runtime.runner(session, io_binding=True)(["logits"], feed)[0]
    np.testing.assert_array_equal(plain, bound)
    assert runtime.runner(session) == session.run  # the CPU default needs no binding


def test_a_session_that_did_not_start_on_cuda_is_an_error_under_cuda_and_a_warning_under_auto():
    session = runtime.make_session(conv_net(bn=True), "cpu")  # what onnxruntime-gpu gives when cuDNN is missing
    with pytest.raises(AsrError, match="--device cuda: onnxruntime could not start CUDAExecutionProvider"):
        runtime.check_provider(session, "CUDAExecutionProvider", "cuda")
    with pytest.warns(UserWarning, match="runs on CPUExecutionProvider"):
        assert runtime.check_provider(session, "CUDAExecutionProvider", "auto") is session
    assert runtime.check_provider(session, "CPUExecutionProvider", "cpu") is session
    with pytest.raises(AsrError, match=r"runs on CPUExecutionProvider \(CUDA failure 100: no CUDA-capable device"):
        runtime.check_provider(session, "CUDAExecutionProvider", "cuda", runtime.fallback_cause(PRINTED))


# onnxruntime-gpu 1.31.1's printout on an H100 machine run with CUDA_VISIBLE_DEVICES= (C++ signatures cut)
PRINTED = """EP Error /onnxruntime_src/onnxruntime/core/providers/cuda/cuda_call.cc:154 std::conditional_t<THRW, void, \
onnxruntime::common::Status> onnxruntime::CudaCall(ERRTYPE, const char*, const char*, SUCCTYPE, const char*, const char*, \
int) [with ERRTYPE = cudaError; bool THRW = true; SUCCTYPE = cudaError] CUDA failure 100: no CUDA-capable device is \
detected ; GPU=-1 ; hostname=vm ; file=/onnxruntime_src/onnxruntime/core/providers/cuda/cuda_execution_provider.cc ; \
line=355 ; expr=cudaSetDevice(info_.device_id); 
 when using ['CUDAExecutionProvider', 'CPUExecutionProvider']
Falling back to ['CPUExecutionProvider'] and retrying.
****************************************
"""


def test_the_fallback_cause_is_onnxruntimes_reason_without_its_source_location():
    assert runtime.fallback_cause(PRINTED) == "CUDA failure 100: no CUDA-capable device is detected"
    assert runtime.fallback_cause("EP Error odd failure when using ['CUDAExecutionProvider']\n") == "odd failure"
    assert runtime.fallback_cause("") == ""
