"""Benchmark harness: scenario matrices run through launch/train.py, side by side with the HF Trainer.

Lives outside engine/ on purpose: the engine never imports it, and only this package may use the
Hugging Face Trainer (as the baseline to beat).
"""
