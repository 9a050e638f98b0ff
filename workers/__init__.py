"""streamgen data plane: model runtime, caches, stages and the pipeline engine."""
