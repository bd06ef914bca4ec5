"""What a pipeline is made of, from the model description up to the layer list and its stage boundaries.

Lowest layer of hfpipe: ``meta`` (meta-device surgery) < ``adapters`` (one description per family) < ``layers`` /
``heads`` (the pipeline layers, their kinds and capabilities as class attributes) < ``partition`` / ``costs`` /
``weights`` / ``batches`` < ``builder`` (the fixed layer list and the boundaries); ``dsconfig`` holds the DeepSpeed
config rules. Nothing here imports a module above ``hfpipe.core`` or touches ``torch.distributed``.
"""
