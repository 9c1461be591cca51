"""Models: base resolution (the embedded GGUF base, fingerprints), reading finetunes (LoRA adapters and
full models) and their LoRA factors, and the batched LoRA hooks."""
