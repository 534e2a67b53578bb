"""Export adapters for serving engines (``zcompile export ...``).

- ``peft_neutral``: a PEFT LoRA adapter with every module's true scale folded into ``lora_B``
  and a config that gives scale 1 to every reader (vLLM, TensorRT-LLM, SGLang, PEFT);
- ``bdlora_tp``: a BD-LoRA adapter cut into ``n`` tensor-parallel shards (ordinary LoRA of rank
  ``r/n`` each) plus a densified plain LoRA;
- ``hf_zflora``: a model with zFLoRA adapters as a standard Hugging Face checkpoint (hidden size
  ``d + r``, explicit ``head_dim``, untied embeddings, rescaled norms).

See docs/serving.md.  Needs the torch extra (torch, safetensors; transformers for ``hf_zflora``).
"""

from __future__ import annotations

__all__ = ["export_bdlora_tp", "export_hf_zflora", "export_peft"]


def __getattr__(name):
    if name == "export_peft":
        from zflora_compile.export.peft_neutral import export_peft

        return export_peft
    if name == "export_bdlora_tp":
        from zflora_compile.export.bdlora_tp import export_bdlora_tp

        return export_bdlora_tp
    if name == "export_hf_zflora":
        from zflora_compile.export.hf_zflora import export_hf_zflora

        return export_hf_zflora
    raise AttributeError(name)
