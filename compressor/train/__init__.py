"""Training a compressed model: healing (distillation or labels), LoRA adapters, crash-safe checkpoints."""
