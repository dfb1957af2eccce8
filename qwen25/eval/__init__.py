"""Evaluation. Long-context probes so far:

- `filler.py`: filler text (generated, built-in corpora, files) as token pools;
- `longctx.py`: passkey retrieval and needle-in-a-haystack (exact and log-likelihood
  scoring), accuracy grids, markdown tables and heat maps;
- `position_ppl.py`: next-token loss against position, chunked through a KV cache;
- `longctx_demo.py`: a small model trained at length L, probed at L, 2L and 4L with plain
  RoPE, YaRN, DCA and YaRN + DCA.
Nothing is imported here, so importing a submodule stays cheap.
"""
