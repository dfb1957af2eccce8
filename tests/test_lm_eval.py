"""lm-evaluation-harness against `qwen25 serve`, as an evaluation user runs it.

lm-eval's `local-completions` scores a multiple-choice answer by sending context + answer
token ids with `echo: true, logprobs: 1, max_tokens: 1` and summing
`token_logprobs[ctxlen:-1]`: the entry after the answer must be the *generated* token,
whatever it is. When that token is a stop token the server once left it out of the
logprobs, which silently dropped the answer's last token (a one-token answer scored 0.0).

References: transformers' Qwen2ForCausalLM on the same checkpoint and the same token ids
(lm-eval's own tokenisation rule: encode(context + continuation) split after
encode(context)), float32, abs 1e-4 per item; for `local-chat-completions`, the engine
in-process (greedy, `qwen25.assistant.chat`) on the messages lm-eval sent. The model's
lm_head is edited so that after some answers its most likely token is <|endoftext|> (a
stop token of the server), and the test checks that both kinds of item occur.

lm-eval runs in a subprocess with the HF hub and datasets offline; the tasks are YAML files
over local jsonl files written into tmp_path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
import torch

from serve_support import free_port, random_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ENDOFTEXT, IM_END = 151643, 151645
STOP_IDS = [IM_END, ENDOFTEXT]

QUESTIONS = [
    ("Question: what colour is the sky?\nAnswer:", ["blue", "red", "green light", "a"]),
    ("Question: how many legs has a cat?\nAnswer:", ["four", "two legs", "9", "many"]),
    ("Question: which is a fruit?\nAnswer:", ["apple", "stone wall", "x", "car"]),
    ("Question: what do bees make?\nAnswer:", ["honey", "cheese", "small houses", "b"]),
    ("Question: where is Paris?\nAnswer:", ["France", "in the sea", "7", "Peru"]),
    ("Question: what is ice?\nAnswer:", ["frozen water", "fire", "q", "sand"]),
]
CHAT_PROMPTS = ["Say hello.", "Count to three.", "Name a colour.", "What is two plus two?"]

TASKS = """\
task: q25_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mc}
test_split: test
output_type: multiple_choice
doc_to_text: question
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
---
task: q25_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {gen}
test_split: test
output_type: generate_until
doc_to_text: question
doc_to_target: answer
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 10
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
"""

RUNNER = textwrap.dedent("""
    import json, sys
    import lm_eval
    from lm_eval.tasks import TaskManager

    cfg = json.loads(sys.argv[1])
    tm = TaskManager(include_path=cfg["tasks"])
    out = {}
    for key, model, task, extra in (("mc", "local-completions", "q25_mc", {"batch_size": 4}),
                                    ("gen", "local-chat-completions", "q25_gen", {"apply_chat_template": True})):
        r = lm_eval.simple_evaluate(model=model, model_args=cfg[key], tasks=[task], task_manager=tm,
                                    log_samples=True, **extra)
        out[key] = [{"doc_id": s["doc_id"], "arguments": s["arguments"], "resps": s["resps"]}
                    for s in r["samples"][task]]
    json.dump(out, open(cfg["out"], "w"))
""")


def _pairs(hf_tok):
    """(context ids, continuation ids) of every (question, choice), tokenised as lm-eval does."""
    out = []
    for question, choices in QUESTIONS:
        for choice in choices:
            ctx, cont = question, " " + choice
            whole = hf_tok(ctx + cont, add_special_tokens=False)["input_ids"]
            ctx_ids = hf_tok(ctx, add_special_tokens=False)["input_ids"]
            out.append((question, choice, ctx_ids, whole[len(ctx_ids):]))
    return out


def _make_eos_likely(ckpt: Path, pairs) -> None:
    """Point the lm_head row of <|endoftext|> at the final hidden state after every second
    question's answers, so that the model's most likely next token there is a stop token."""
    from qwen25 import load_model, save_model

    model = load_model(ckpt, dtype=torch.float32)
    hidden = []
    with torch.no_grad():
        for q, (question, choices) in enumerate(QUESTIONS):
            if q % 2:
                continue
            for _, _, ctx, cont in (p for p in pairs if p[0] == question):
                h, _ = model.hidden_states(torch.tensor([ctx + cont]))
                hidden.append(h[0, -1])
        hidden = torch.stack(hidden)
        direction = (hidden / hidden.norm(dim=-1, keepdim=True)).mean(0)
        # the eos logit is 10 there at least: above the random model's best (~5), and small
        # enough that log-likelihoods stay moderate (float32 rounding far below 1e-4)
        model.lm_head.weight[ENDOFTEXT] = 10.0 * direction / float((hidden @ direction).min())
    save_model(model, ckpt)


def _reference_logliks(ckpt: Path, pairs):
    """transformers: sum of log p(continuation | context) and the argmax after the answer."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for _, _, ctx, cont in pairs:
            ids = torch.tensor([ctx + cont])
            logp = torch.log_softmax(hf(ids).logits[0].float(), -1)
            positions = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
            ll = sum(float(logp[p, t]) for p, t in zip(positions, cont))
            out.append((ll, int(logp[-1].argmax())))
    return out


@pytest.mark.slow
def test_lm_eval_local_completions_and_chat_against_qwen25_serve(tmp_path):
    from transformers import AutoTokenizer

    ckpt = random_checkpoint(tmp_path / "model", seed=3, generation_config={"eos_token_id": STOP_IDS})
    hf_tok = AutoTokenizer.from_pretrained(ckpt)
    pairs = _pairs(hf_tok)
    _make_eos_likely(ckpt, pairs)
    reference = _reference_logliks(ckpt, pairs)
    after = [argmax for _, argmax in reference]
    assert any(a in STOP_IDS for a in after) and any(a not in STOP_IDS for a in after)  # both kinds occur

    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps({"question": q, "choices": c, "label": 0}) + "\n" for q, c in QUESTIONS))
    gen = tmp_path / "gen.jsonl"
    gen.write_text("".join(json.dumps({"question": q, "answer": "x"}) + "\n" for q in CHAT_PROMPTS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for i, doc in enumerate(TASKS.format(mc=mc, gen=gen).split("---\n")):
        (tasks / f"task{i}.yaml").write_text(doc)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OPENAI_API_KEY": "x"}
    server = subprocess.Popen([sys.executable, "-m", "qwen25", "serve", str(ckpt), "--port", str(port),
                               "--served-model-name", "tiny", "--max-batch-size", "4", "--log-level", "warning"],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600  # a loaded CI machine starts slowly
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not become healthy"
            time.sleep(0.3)
        common = {"model": "tiny", "max_retries": 1, "num_concurrent": 1}
        cfg = {"tasks": str(tasks), "out": str(tmp_path / "samples.json"),
               "mc": {**common, "base_url": url + "/v1/completions", "tokenizer_backend": "huggingface",
                      "tokenizer": str(ckpt)},
               "gen": {**common, "base_url": url + "/v1/chat/completions"}}
        run = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(cfg)], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
    finally:
        server.terminate()
        server.wait(timeout=60)
    samples = json.loads((tmp_path / "samples.json").read_text())

    got = {}  # (question, choice) -> lm-eval's log-likelihood
    for s in samples["mc"]:
        question, choices = QUESTIONS[s["doc_id"]]
        for choice, resp in zip(choices, s["resps"]):
            got[(question, choice)] = resp[0][0]
    assert len(got) == len(pairs)
    for (question, choice, _, _), (want, _) in zip(pairs, reference):
        assert got[(question, choice)] == pytest.approx(want, abs=1e-4), (question, choice)

    from qwen25 import Engine, load_model, load_tokenizer
    from qwen25.assistant import chat

    model = load_model(ckpt, dtype=torch.float32)
    engine = Engine(model, max_batch_size=1, max_seq_len=256)
    tok = load_tokenizer(ckpt)
    assert len(samples["gen"]) == len(CHAT_PROMPTS)
    for s in samples["gen"]:
        messages = s["arguments"][0][0]  # lm-eval logs the chat request as a JSON string
        while isinstance(messages, list) and len(messages) == 1 and isinstance(messages[0], str):
            messages = messages[0]
        messages = json.loads(messages) if isinstance(messages, str) else messages
        assert messages == [{"role": "user", "content": CHAT_PROMPTS[s["doc_id"]]}]
        want = chat(engine, tok, messages, max_new_tokens=10, temperature=0, stop=["\n\n"], stop_token_ids=STOP_IDS)
        assert s["resps"][0][0] == want.text
