"""Tiny random-weight models for tests: a re-export of `optistack.testing` (where they live, for users
too), kept so the many `from tiny_models import ...` lines read as before."""
from optistack.testing.models import (  # noqa: F401
    ARCHITECTURES,
    image_inputs,
    t5_inputs,
    tiny_bert,
    tiny_cnn,
    tiny_gpt2,
    tiny_gpt_neox,
    tiny_llama,
    tiny_llama_workload,
    tiny_mlp,
    tiny_opt,
    tiny_phi3,
    tiny_t5,
    token_inputs,
)
