"""Training over a DeepSpeed ``PipelineEngine``: arguments, the merged DeepSpeed config, callbacks and the trainer.

Above ``hfpipe.pipeline`` and its uses (checkpoint, generation, hub); below the tasks, recipes and the CLI.
"""
