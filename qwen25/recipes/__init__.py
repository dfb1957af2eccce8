"""Recipes: end-to-end runs that chain the stages through their public functions.

- `speedrun.py`: tokenizer -> shards -> pretraining -> report on built-in data;
- `longctx_demo.py`: a small model trained at length L, probed at L, 2L and 4L with plain
  RoPE, YaRN, DCA and YaRN + DCA.
A recipe sits above training and evaluation (it may import both); nothing imports a recipe
except the CLI. Nothing is imported here, so importing a submodule stays cheap.
"""
