"""Deployment forms of a fused model's adapter: ONNX Runtime ``.onnx_adapter`` files (:mod:`.onnx_adapter`)."""
