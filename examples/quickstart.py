"""Optimize the bundled MiniLM encoder and print the measured report.

    python examples/quickstart.py            # about a minute on 2 CPU cores
"""
import optistack as ost

wl = ost.workloads.load("minilm")  # all-MiniLM-L6-v2, batch 8 x 128, cosine + retrieval metric
result = ost.Pipeline.parse("int8-dynamic,compile").run(wl, max_accuracy_drop=0.01)

result.report.print()  # one row per pass: status, speedup [95% CI], accuracy before -> after
result.report.save("minilm-report.json")  # the public JSON (schema optistack.report/1)
result.report.plot("minilm-report.png")  # speedup against accuracy drop, per pass

embeddings = wl.run(result.model).last_hidden_state  # the optimized model is used like the original
print("output shape:", tuple(embeddings.shape))
