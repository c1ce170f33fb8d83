"""dpo-dist: distributed Direct Preference Optimization for Qwen-family models under DeepSpeed ZeRO."""

__version__ = "0.1.0"
