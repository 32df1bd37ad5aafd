"""What every stage uses and none owns: file safety, errors and the CLI style, the tokenizer, progress bars,
the GPU data sheet and the YAML rule. Nothing here imports torch or another stage."""
