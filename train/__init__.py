"""Supervised fine-tuning of Gemma with LoRA: data (`train.data`), the loop, and the `python -m train.sft` entry
point."""
