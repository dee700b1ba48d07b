"""Decoding passes: they change how tokens are generated (the decode loop, the KV cache), not the weights.

They act through the decode protocol of `optistack.generation` (attributes on the model that
`greedy_decode` consults), so the workload keeps owning and timing the loop.
"""
