"""Serving passes: change what a served LLM costs without (or before) touching its kernels.

prompt_compress (LLMLingua, offline), lora_merge (PEFT adapters into the weights), attention
(attn_implementation and the SDPA backend). See docs/serving.md.
"""
