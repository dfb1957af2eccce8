"""The reward model: our unmodified decoder plus a scalar head read at the last real token.

`RewardModel(backbone)` wraps a `Transformer` (an SFT checkpoint, say) and adds `score`, a
bias-free Linear(hidden, 1), the layout of HF `Qwen2ForSequenceClassification` with
num_labels = 1. The decoder's final-normed hidden state at each row's last *real* token
(found from the attention mask, never from the pad id) goes through the head: a score in
float32 per sequence.

Where the score is read is the classic bug (trl#2778): HF finds the last token that is not
`pad_token_id`, which goes wrong when pad = EOS and the sequence ends with EOS. Reading it
from the attention mask is right for left and right padding alike, and our decoder computes
positions from the same mask, so a row scores the same alone or padded in any batch
(allenai/reward-bench#137). `save_reward_model` writes an HF folder (`model.*` decoder
weights + `score.weight`, `architectures: [Qwen2ForSequenceClassification]`, one label,
`pad_token_id` set) that `transformers.AutoModelForSequenceClassification` loads and scores
identically (tests/test_reward_model.py); `load_reward_model` reads it back.

`score_batches` scores token sequences in length-sorted batches, returning scores in input
order: the `qwen25 reward score` verb and GRPO rewards use it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from qwen25.checkpoint import CheckpointError, _destination, _weight_files, load_config
from qwen25.errors import UserError
from qwen25.files import atomic_path, atomic_write
from qwen25.model.model import Transformer, build_model

ARCHITECTURE = "Qwen2ForSequenceClassification"
HEAD_KEY = "score.weight"


class RewardModel(nn.Module):
    """backbone: a `Transformer` used as it is (its `hidden_states`; the LM head is unused)."""

    def __init__(self, backbone: Transformer, pad_token_id: int, head: nn.Linear | None = None):
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        self.pad_token_id = pad_token_id
        self.score = head if head is not None else nn.Linear(
            backbone.config.hidden_size, 1, bias=False, device=backbone.device, dtype=backbone.dtype)

    @torch.no_grad()
    def init_head(self, seed: int = 0) -> None:
        """N(0, initializer_range), as HF initialises a new classification head."""
        g = torch.Generator(device=self.score.weight.device).manual_seed(seed)
        self.score.weight.normal_(0.0, self.config.initializer_range, generator=g)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, score_at: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T], attention_mask [B, T] (1 real, 0 pad; None = no padding)
        -> scores [B] float32, the head at each row's last real token.

        With `score_at` [B, k] (indices into T): attention_mask is a [B, 1, T, T] bool mask
        and positions [B, T] are given (`collate_shared_prompt`), and the scores [B, k] are
        the head at those indices."""
        if score_at is not None:
            h, _ = self.backbone.hidden_states(input_ids, positions=positions, attention_mask=attention_mask)
            pooled = h[torch.arange(h.shape[0], device=h.device)[:, None], score_at]  # [B, k, hidden]
            return self.score(pooled).squeeze(-1).float()
        # Right padding needs no mask: in a causal model every real token attends to earlier,
        # real tokens only, and positions 0..T-1 are theirs (the unmasked kernel is faster).
        # Any other padding (left, gaps) goes through the mask and mask-derived positions.
        right_padded = attention_mask is None or bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())
        h, _ = self.backbone.hidden_states(input_ids, attention_mask=None if right_padded else attention_mask)
        last = last_real_index(attention_mask, input_ids.shape[1], input_ids.device, input_ids.shape[0])
        pooled = h[torch.arange(h.shape[0], device=h.device), last]  # [B, hidden]
        return self.score(pooled).squeeze(-1).float()


def pair_scores(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen scores [B], rejected scores [B]) of a collated batch: `collate_pairs` rows
    (chosen rows, then rejected) or `collate_shared_prompt` rows (both after one prompt)."""
    # through the module's __call__: a DDP wrapper must see the forward
    if "chosen_last" not in batch:
        return model(batch["input_ids"], batch["attention_mask"]).chunk(2)
    at = torch.stack([batch["chosen_last"], batch["rejected_last"]], dim=1)  # [B, 2]
    scores = model(batch["input_ids"], batch["attention_mask"], positions=batch["positions"], score_at=at)
    return scores[:, 0], scores[:, 1]


def last_real_index(attention_mask: torch.Tensor | None, T: int, device, B: int) -> torch.Tensor:
    """[B] index of each row's rightmost real token (T - 1 without a mask)."""
    if attention_mask is None:
        return torch.full((B,), T - 1, dtype=torch.long, device=device)
    positions = torch.arange(T, device=device)
    if not bool(attention_mask.bool().any(-1).all()):
        raise ValueError("a row of the batch has no real token")
    return (positions * attention_mask.bool()).argmax(-1)


# --------------------------------------------------------------------------------------
# HF folder in and out
# --------------------------------------------------------------------------------------


def reward_config_json(model: RewardModel) -> dict:
    cfg = model.config
    d = cfg.to_hf() | {"torch_dtype": str(model.score.weight.dtype).removeprefix("torch.")}
    d["architectures"] = [ARCHITECTURE]
    d["id2label"], d["label2id"] = {"0": "LABEL_0"}, {"LABEL_0": 0}  # num_labels = 1
    d["pad_token_id"] = model.pad_token_id
    return d


def save_reward_model(model: RewardModel, path: str | Path) -> Path:
    """Write `path` as an HF `Qwen2ForSequenceClassification` folder (one safetensors file)."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in reward_state_dict(model).items()}
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    atomic_write(folder / "config.json", json.dumps(reward_config_json(model), indent=2) + "\n")
    return folder


def reward_state_dict(model: RewardModel) -> dict[str, torch.Tensor]:
    """Checkpoint-named tensors: the decoder as `model.*` (experts split) and `score.weight`."""
    from qwen25.checkpoint import _to_checkpoint_tensors

    out = {k: t for k, t in _to_checkpoint_tensors(model.backbone) if k != "lm_head.weight"}
    out[HEAD_KEY] = model.score.weight
    return out


def load_reward_model(path: str | Path, dtype: torch.dtype | None = None,
                      device: torch.device | str = "cpu") -> RewardModel:
    """Read a reward-model folder written by `save_reward_model` (or by transformers)."""
    folder = Path(path)
    raw = _read_config(folder)
    if ARCHITECTURE not in (raw.get("architectures") or []):
        raise UserError(f"{folder} is not a reward model (architectures {raw.get('architectures')}); "
                        f"pass a folder written by `qwen25 reward train` ({ARCHITECTURE})")
    labels = len(raw.get("id2label") or {"0": None})
    if labels != 1:
        raise UserError(f"{folder}: the classifier has {labels} labels; a reward model has 1")
    cfg = load_config(folder)
    if cfg.pad_token_id is None:
        raise UserError(f"{folder}/config.json has no pad_token_id; set it to the tokenizer's pad id")
    backbone = build_model(cfg, device=device, dtype=dtype or torch.float32, init=False)
    with torch.no_grad():
        backbone.lm_head.weight.zero_()  # unused by the reward model; never left uninitialised
    model = RewardModel(backbone, cfg.pad_token_id)
    params = dict(backbone.named_parameters())
    seen = set()
    located = _weight_files(folder)
    files = sorted(set(located.values())) if isinstance(located, dict) else [located]
    with torch.no_grad():
        for file in files:
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in f.keys():
                    t = f.get_tensor(key)
                    if key == HEAD_KEY:
                        dest = model.score.weight
                    elif key.startswith("model."):
                        try:
                            dest = _destination(params, key)
                        except KeyError:
                            raise CheckpointError(f"{file}: unexpected tensor {key!r}") from None
                    else:
                        continue
                    if tuple(dest.shape) != tuple(t.shape):
                        raise CheckpointError(f"{file}: {key} has shape {list(t.shape)}, config.json "
                                              f"implies {list(dest.shape)}")
                    dest.copy_(t)
                    seen.add(key)
    from qwen25.checkpoint import checkpoint_shapes

    missing = sorted((set(checkpoint_shapes(cfg)) - {"lm_head.weight"} | {HEAD_KEY}) - seen)
    if missing:
        raise CheckpointError(f"{folder}: missing tensor(s) {missing[:3]}; the weights do not match config.json")
    backbone.tie_weights()
    return model.eval()


def _read_config(folder: Path) -> dict:
    try:
        raw = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise UserError(f"{folder}: no config.json; pass a reward-model folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{folder}/config.json is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{folder}/config.json must be a JSON object")
    return raw


# --------------------------------------------------------------------------------------
# Scoring in batches
# --------------------------------------------------------------------------------------


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) int64 [B, T] of token lists padded on `side`."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        ids[i, sl] = torch.tensor(list(s), dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


@torch.no_grad()
def score_batches(model: RewardModel, seqs: Sequence[Sequence[int]], batch_size: int = 8,
                  progress: Callable[[int], None] | None = None) -> list[float]:
    """Scores of token sequences, in input order; batches of similar lengths (less padding).
    progress(n): called after each batch with the number of sequences it scored."""
    if any(len(s) == 0 for s in seqs):
        raise UserError("cannot score an empty sequence")
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = [0.0] * len(seqs)
    device = model.backbone.device
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids, mask = pad_batch([seqs[i] for i in chunk], model.pad_token_id)
        scores = model(ids.to(device), mask.to(device))
        for i, s in zip(chunk, scores.tolist()):
            out[i] = s
        if progress is not None:
            progress(len(chunk))
    return out
