"""The GPT-2 network, shared by train/ and eval/: `from model.gpt import GPT`, `from model.config import GPTConfig`.

Importing the package imports nothing: `model.config` (shapes, presets) works without torch; `model.gpt` loads it.
"""
