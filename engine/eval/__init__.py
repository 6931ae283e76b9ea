"""Quality of a converted checkpoint against its source, layer-streamed: `evaluate()` (engine.eval.streaming)."""
