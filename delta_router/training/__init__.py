"""Training: LoRA finetuning (``LoraTrainer``) on prompt + continuation token sequences."""
