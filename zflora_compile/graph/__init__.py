"""One graph view and one emitter per IR, and the IR-neutral records detection produces.

- :mod:`.records`: sites, rejections, the detection result (no IR in them).
- :mod:`.protocol`: what a family's matcher may ask of a graph, and what its rewrite may emit.
- :mod:`.onnx_ir`: the view and emitter over onnx-ir; :mod:`.torch_fx`: over torch.fx.
"""
