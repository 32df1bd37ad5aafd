"""GPT-2 pretraining with DeepSpeed: `python -m train --config configs/train/NAME.yaml [--set key=value ...]`."""
