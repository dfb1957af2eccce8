"""Evaluation. Long-context probes so far:

- `filler.py`: filler text (generated, built-in corpora, files) as token pools;
- `longctx.py`: passkey retrieval and needle-in-a-haystack (exact and log-likelihood
  scoring), accuracy grids, markdown tables and heat maps;
- `position_ppl.py`: next-token loss against position, chunked through a KV cache.
The long-context demo (train, then probe) is a recipe: `qwen25.recipes.longctx_demo`.
Nothing is imported here, so importing a submodule stays cheap.
"""
