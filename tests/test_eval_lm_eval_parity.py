"""Per-item log-likelihoods and acc/acc_norm equal lm-evaluation-harness's `hf` backend.

The items are real benchmark examples (ARC-Easy 1-shot, HellaSwag 0-shot, MMLU 0-shot, as
our tasks build them) written to a local task (jsonl + YAML, the multiple_choice output
type, " " target delimiter), so lm-eval scores exactly our contexts and choices. Model: a
tiny random Qwen2 (transformers) saved with the built-in Qwen tokenizer. Tolerance 1e-4
nats per choice (both run float32; ours shares each context's KV cache across choices).
"""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("lm_eval")

from qwen25 import load_model, load_tokenizer  # noqa: E402
from qwen25.eval.backends import LocalBackend  # noqa: E402
from qwen25.eval.harness import _run_mc  # noqa: E402
from qwen25.eval.tasks import get_task  # noqa: E402

YAML = """task: qwen25_parity
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def _examples():
    out = []
    for name, k, n in (("arc_easy", 1, 6), ("hellaswag", 0, 4), ("mmlu", 0, 4)):
        out += get_task(name).examples(k)[:n]
    return out


@pytest.fixture
def tiny_hf(hf_qwen2):
    path, _ = hf_qwen2(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                       tie_word_embeddings=False)
    load_tokenizer("qwen2.5").save_pretrained(path)
    return path


@pytest.mark.slow
def test_loglikelihoods_and_acc_match_lm_eval_hf(tiny_hf, tmp_path, monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "ds-cache"))
    examples = _examples()
    # Shared-context tasks only: lm-eval's multiple_choice type has one context per item.
    data = tmp_path / "items.jsonl"
    with open(data, "w") as f:
        for ex in examples:
            assert len(set(ex.contexts)) == 1
            choices = [c[1:] for c in ex.continuations]  # lm-eval adds the " " delimiter itself
            f.write(json.dumps({"context": ex.contexts[0], "choices": choices, "gold": ex.gold}) + "\n")
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / "qwen25_parity.yaml").write_text(YAML.format(data=data))

    import lm_eval
    from lm_eval.tasks import TaskManager

    ref = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tiny_hf},dtype=float32,device=cpu",
                                  tasks=["qwen25_parity"], num_fewshot=0, batch_size=4, log_samples=True,
                                  task_manager=TaskManager(include_path=str(tasks_dir)))
    ref_samples = sorted(ref["samples"]["qwen25_parity"], key=lambda s: s["doc_id"])

    backend = LocalBackend(load_model(tiny_hf, dtype="float32"), load_tokenizer(tiny_hf))
    rows: list[dict] = []
    ours = _run_mc(backend, None, examples, False, rows)
    assert len(ref_samples) == len(rows) == len(examples)
    worst = 0.0
    for s, row, sc in zip(ref_samples, rows, ours):
        ref_ll = [float(r[0][0]) for r in s["resps"]]
        assert len(ref_ll) == len(row["logliks"])
        worst = max(worst, max(abs(a - b) for a, b in zip(ref_ll, row["logliks"])))
        assert sc["acc"] == s["acc"] and sc["acc_norm"] == s["acc_norm"], (row["id"], ref_ll, row["logliks"])
    assert worst < 1e-4, worst
    agg = ref["results"]["qwen25_parity"]
    assert abs(agg["acc,none"] - sum(x["acc"] for x in ours) / len(ours)) < 1e-12
    assert abs(agg["acc_norm,none"] - sum(x["acc_norm"] for x in ours) / len(ours)) < 1e-12
