"""kvrecall.integrations: models running through kvrecall.

- kvrecall.integrations.llama: a plain PyTorch runner for Llama-architecture
  safetensors checkpoints (prefill in torch, K/V stored in kvrecalld, decode
  attention through kvrecall.worker, prefix reuse).
- kvrecall.integrations.transformers: a Cache and an attention function for
  Hugging Face transformers 5.x (LlamaForCausalLM.generate with kvrecall).
- kvrecall.integrations.capture: post-RoPE Q/K/V captures (kvrecall-capture).
- kvrecall.integrations.policies, .artifacts: role tables and calibration
  artifacts (Loki bases, sparse encoders).
"""
