"""Training-framework integrations: callbacks that run an optistack pipeline on the model being trained.

    from optistack.integrations.transformers import OptistackCallback   # imports transformers
    from optistack.integrations.lightning import OptistackCallback      # imports lightning
    from optistack.integrations.pytorch_lightning import OptistackCallback  # the older package name

This package imports nothing itself: a framework is imported only with the module named after it, so
`import optistack` stays lean for users of neither.
"""
