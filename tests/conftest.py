"""Shared fixtures: tiny adapted models exported once per test session."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest


class ModelCache:
    """Builds and exports each (builder kwargs, export kwargs) combination once per session."""

    def __init__(self, root):
        self.root = root
        self.entries: dict = {}

    def get(self, name: str, *, export=None, **build):
        from zflora_compile import zoo

        key = (name, repr(sorted(build.items(), key=str)), repr(sorted((export or {}).items())))
        if key not in self.entries:
            model = zoo.build_lora_model(**build)
            path = zoo.export_onnx(model, self.root / name / "model.onnx", **(export or {}))
            self.entries[key] = (path, model)
        return self.entries[key]


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> ModelCache:
    return ModelCache(tmp_path_factory.mktemp("models"))


def run_onnx(path, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def token_feeds(seq: int, vocab: int = 128, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(1, seq)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}
