"""Foreign checkpoint formats: GGUF (llama.cpp) in, and the name tables GGUF export shares.

`gguf_names` (pure tables and the Llama Q/K row order), `gguf_file` (opening a file with
one-line errors), `gguf_import` (GGUF -> model, config, HF folder).
"""
