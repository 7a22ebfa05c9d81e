"""looptrain models outside looptrain: the transformers export (`looptrain export --format hf`).

`configuration_looptrain.py`, `modeling_looptrain.py` and `tokenization_looptrain.py`
are copied into every export and import only torch, transformers and sentencepiece;
`export.py` writes the folder. Nothing here is imported by `import looptrain`.
"""
