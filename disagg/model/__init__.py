"""The model: HF checkpoint loading, tokenizer + chat template, Llama-family forward."""
