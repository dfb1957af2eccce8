"""Preference training throughput: our DPO and reward-model steps vs TRL's DPOTrainer / RewardTrainer.

Both sides train the same model (the CPU speedrun's shape by default) from the same weights
on the same token ids (random prompts and answers of mixed lengths), with the same batch,
precision, gradient clipping and AdamW. TRL runs its own collator and `training_step`
(compute_loss, backward) followed by its optimizer's step; ours runs the stage's loss in
`train_step`. DPO reference log-probs are precomputed on both sides (TRL's
`precompute_ref_log_probs` path: the collated batch carries `ref_*_logps`), which is how
`qwen25 dpo` always runs; `--trl-live-ref` lets TRL run its reference model every step
instead (its default). Rounds alternate so that a shared machine's drift hits both alike;
medians are compared.

    python benchmarks/dpo.py                        # CPU, fp32, both stages
    python benchmarks/dpo.py --device cuda --precision bf16 --preset 0.5B --batch 16
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import alternate  # noqa: E402
from qwen25.config import ModelConfig  # noqa: E402
from qwen25.data.preference import PreferencePair, collate_pairs, collate_shared_prompt  # noqa: E402
from qwen25.model.model import build_model  # noqa: E402
from qwen25.train.dpo_loss import bradley_terry_loss, dpo_loss, pair_logprobs  # noqa: E402
from qwen25.train.loop import train_step  # noqa: E402
from qwen25.train.optim import build_optimizer  # noqa: E402
from qwen25.train.parallel import World  # noqa: E402
from qwen25.train.reward_model import RewardModel, pair_scores  # noqa: E402

SPEEDRUN = dict(hidden_size=192, intermediate_size=576, num_hidden_layers=4, num_attention_heads=3,
                num_key_value_heads=1, vocab_size=8192, tie_word_embeddings=True, rope_theta=10_000.0)
LR, BETA = 1e-5, 0.1


def make_pairs(n: int, vocab: int, prompt_len: int, answer_len: int, seed: int = 0) -> list[PreferencePair]:
    r = random.Random(seed)
    tok = lambda k: [r.randrange(1, vocab) for _ in range(k)]  # noqa: E731  (0 is the pad id)
    out = []
    for _ in range(n):
        p = tok(r.randint(prompt_len // 2, prompt_len))
        c, j = tok(r.randint(answer_len // 2, answer_len)), tok(r.randint(answer_len // 2, answer_len))
        out.append(PreferencePair(p, c, j, [1] * len(c), [1] * len(j)))
    return out


def hf_model(cfg: ModelConfig, state: dict, kind: str, device):
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

    hf_cfg = Qwen2Config(**{k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "model_type")},
                         num_labels=1, pad_token_id=0)
    hf_cfg._attn_implementation = "sdpa"
    cls = Qwen2ForCausalLM if kind == "lm" else Qwen2ForSequenceClassification
    model = cls(hf_cfg)
    model.load_state_dict(state, strict=False)
    return model.float().to(device).train()  # fp32 master weights, as ours (autocast gives bf16)


def small_tokenizer(root: Path):
    from qwen25.tokenizer.train import train_tokenizer

    (root / "c.txt").write_text("a b c d e f g the answer is 1 2 3\n" * 50)
    train_tokenizer([root / "c.txt"], 300, root / "tok", show_progress=False)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(root / "tok")


# ---- DPO ---------------------------------------------------------------------------------


def ours_dpo(cfg, pairs, ref, device, autocast):
    model = build_model(cfg, device=device, dtype=torch.float32, seed=0).train()
    opt = build_optimizer(model, LR, (0.9, 0.999), 1e-8, 0.0)
    batch = {k: v.to(device) for k, v in collate_pairs(pairs, 0).items()} | {
        "ref_chosen": ref[0].to(device), "ref_rejected": ref[1].to(device)}
    world = World(device=device)

    def loss_fn(m, b):
        out = dpo_loss(pair_logprobs(m, b), b["ref_chosen"], b["ref_rejected"], beta=BETA)
        return out.losses.sum(), out.losses.shape[0]

    return lambda: train_step(model, opt, [batch], loss_fn, lr=LR, world=world, grad_clip=1.0,
                              autocast_dtype=autocast)


def trl_dpo(cfg, pairs, ref, device, precision, root, live_ref):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    state = build_model(cfg, device="cpu", dtype=torch.float32, seed=0).state_dict()
    model = hf_model(cfg, state, "lm", device)
    ref_model = hf_model(cfg, state, "lm", device).eval() if live_ref else None
    tok = small_tokenizer(root)
    rows = [{"prompt": "a b", "chosen": " c", "rejected": " d"}] * 2
    args = DPOConfig(output_dir=str(root / "trl-dpo"), beta=BETA, learning_rate=LR, report_to="none",
                     use_cpu=device.type == "cpu", bf16=precision == "bf16", per_device_train_batch_size=len(pairs),
                     max_length=None, precompute_ref_log_probs=not live_ref, max_grad_norm=1.0)
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok)
    examples = [{"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids}
                | ({} if live_ref else {"ref_chosen_logps": float(ref[0][i]), "ref_rejected_logps": float(ref[1][i])})
                for i, p in enumerate(pairs)]
    inputs = {k: v.to(device) for k, v in trainer.data_collator(examples).items()}
    return _trl_runner(trainer, inputs)


def _trl_runner(trainer, inputs):
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop; one micro-batch here
    trainer.model.train()
    return lambda: _trl_step(trainer, inputs)


def _trl_step(trainer, inputs):
    trainer.training_step(trainer.model, dict(inputs))
    torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), 1.0)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


# ---- reward model ------------------------------------------------------------------------


def ours_rm(cfg, pairs, device, autocast, shared_prompt=True):
    rm = RewardModel(build_model(cfg, device=device, dtype=torch.float32, seed=0), pad_token_id=0).train()
    rm.init_head(0)
    opt = build_optimizer(rm, LR, (0.9, 0.999), 1e-8, 0.0)
    # the stage's default batch layout: chosen and rejected behind one copy of the prompt
    collate = collate_shared_prompt if shared_prompt else collate_pairs
    batch = {k: v.to(device) for k, v in collate(pairs, 0).items()}
    world = World(device=device)

    def loss_fn(m, b):
        rw, rl = pair_scores(m, b)
        losses = bradley_terry_loss(rw, rl)
        return losses.sum(), losses.shape[0]

    return lambda: train_step(rm, opt, [batch], loss_fn, lr=LR, world=world, grad_clip=1.0, autocast_dtype=autocast)


def trl_rm(cfg, pairs, device, precision, root):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    state = build_model(cfg, device="cpu", dtype=torch.float32, seed=0).state_dict()
    model = hf_model(cfg, state, "cls", device)
    tok = small_tokenizer(root)
    rows = [{"chosen": "a b c", "rejected": "a b d"}] * 2
    args = RewardConfig(output_dir=str(root / "trl-rm"), learning_rate=LR, report_to="none",
                        use_cpu=device.type == "cpu", bf16=precision == "bf16",
                        per_device_train_batch_size=len(pairs), max_length=None, max_grad_norm=1.0)
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    examples = [{"chosen_ids": p.prompt_ids + p.chosen_ids, "rejected_ids": p.prompt_ids + p.rejected_ids}
                for p in pairs]
    inputs = {k: v.to(device) for k, v in trainer.data_collator(examples).items()}
    return _trl_runner(trainer, inputs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="speedrun", help="speedrun (the CPU speedrun's model) or a ModelConfig preset")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--answer-len", type=int, default=96)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--trl-live-ref", action="store_true", help="TRL runs its reference model every step")
    p.add_argument("--only", choices=("dpo", "reward"), default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = ModelConfig(**SPEEDRUN) if args.preset == "speedrun" else ModelConfig.preset(args.preset)
    cfg = cfg.replace(max_position_embeddings=max(cfg.max_position_embeddings, args.prompt_len + args.answer_len))
    pairs = make_pairs(args.batch, cfg.vocab_size, args.prompt_len, args.answer_len)
    autocast = torch.bfloat16 if args.precision == "bf16" else None
    with torch.no_grad():  # the stored reference log-probs both sides read
        refm = build_model(cfg, device=device, dtype=torch.float32, seed=0).eval()
        lp = pair_logprobs(refm, {k: v.to(device) for k, v in collate_pairs(pairs, 0).items()})
        ref = (lp.chosen.cpu(), lp.rejected.cpu())
        del refm
    result = {"preset": args.preset, "device": str(device), "precision": args.precision, "batch_pairs": args.batch,
              "threads": torch.get_num_threads(), "trl_live_ref": args.trl_live_ref}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.only in (None, "dpo"):
            t = alternate({"ours": ours_dpo(cfg, pairs, ref, device, autocast),
                           "trl": trl_dpo(cfg, pairs, ref, device, args.precision, root, args.trl_live_ref)},
                          rounds=args.rounds, warmup=args.warmup)
            result |= {"dpo_ours_pairs_per_s": round(args.batch / t["ours"], 2),
                       "dpo_trl_pairs_per_s": round(args.batch / t["trl"], 2), "dpo_ratio": round(t["trl"] / t["ours"], 3)}
        if args.only in (None, "reward"):
            t = alternate({"ours": ours_rm(cfg, pairs, device, autocast),
                           "ours_padded": ours_rm(cfg, pairs, device, autocast, shared_prompt=False),
                           "trl": trl_rm(cfg, pairs, device, args.precision, root)},
                          rounds=args.rounds, warmup=args.warmup)
            result |= {"rm_ours_pairs_per_s": round(args.batch / t["ours"], 2),
                       "rm_trl_pairs_per_s": round(args.batch / t["trl"], 2), "rm_ratio": round(t["trl"] / t["ours"], 3),
                       "rm_ratio_two_padded_rows": round(t["trl"] / t["ours_padded"], 3)}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.preset}, {device}, {args.precision}, {args.batch} pairs/step "
          f"(prompts <= {args.prompt_len}, answers <= {args.answer_len} tokens), {result['threads']} threads")
    if "dpo_ratio" in result:
        print(f"  DPO     ours {result['dpo_ours_pairs_per_s']:8.2f} pairs/s   TRL {result['dpo_trl_pairs_per_s']:8.2f}"
              f"   ratio {result['dpo_ratio']:.2f}x")
    if "rm_ratio" in result:
        print(f"  reward  ours {result['rm_ours_pairs_per_s']:8.2f} pairs/s   TRL {result['rm_trl_pairs_per_s']:8.2f}"
              f"   ratio {result['rm_ratio']:.2f}x (two padded rows per pair, as TRL: "
              f"{result['rm_ratio_two_padded_rows']:.2f}x)")
    print(f"  (median of {args.rounds} alternating rounds)")


if __name__ == "__main__":
    main()
