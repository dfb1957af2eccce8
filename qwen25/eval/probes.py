"""The phase-1 probes as harness tasks: bits per byte, passkey and needle.

- bpb: bits per byte of the held-out synthetic math problems (test families, never in the
  training mix), i.e. sum over each text of -log2 p(token | earlier tokens) divided by the
  text's UTF-8 bytes after its first token (the first token has no context to be scored on);
  lower is better. Scored with the same log-likelihood function as multiple choice.
- passkey / needle: `eval/longctx.py`'s retrieval probes at short lengths (256, 512, 1024
  tokens, depths 0, 0.5, 1; exact greedy match), so they fit any model's context; use
  `qwen25 eval passkey|needle` for the long-context grids.
They need the model in-process (a server cannot hand out its weights' log-likelihoods of
arbitrary text without echo; use the tasks for servers).
"""

from __future__ import annotations

import math
import time

from qwen25.data import mathgen
from qwen25.errors import UserError

BPB_TEXTS = 200
PROBE_LENGTHS = (256, 512, 1024)


def _bpb(backend, cfg) -> tuple[dict, list[dict]]:
    from qwen25.eval.loglik import loglikelihoods

    n = min(cfg.limit or BPB_TEXTS, BPB_TEXTS)
    texts = [p["text"] for p in mathgen.problems("test", n)]
    tok = backend.tokenizer
    reqs, nbytes = [], []
    for t in texts:
        ids = tok.encode(t)
        reqs.append((ids[:1], ids[1:]))
        nbytes.append(len(tok.decode(ids[1:]).encode("utf-8")))
    lls = loglikelihoods(backend.model, reqs)
    per = [-ll.logprob / math.log(2) / b for ll, b in zip(lls, nbytes)]
    total = -sum(ll.logprob for ll in lls) / math.log(2) / sum(nbytes)
    rows = [{"id": f"bpb/{i}", "bits": -ll.logprob / math.log(2), "bytes": b, "bpb": v}
            for i, (ll, b, v) in enumerate(zip(lls, nbytes, per))]
    from qwen25.eval.tasks.base import mean_stderr

    return {"metrics": {"bpb": {"value": total, "stderr": mean_stderr(per)}}, "primary": "bpb", "n": n,
            "num_fewshot": 0, "kind": "probe", "lower_is_better": True,
            "description": "bits per byte, held-out synthetic math"}, rows


def _retrieval(backend, name: str, cfg) -> tuple[dict, list[dict]]:
    from qwen25.eval.longctx import ProbeConfig, evaluate_retrieval

    limit = backend.model.config.max_position_embeddings
    lengths = tuple(n for n in PROBE_LENGTHS if n + 16 <= limit) or (min(limit - 16, 128),)
    trials = 1 if cfg.limit is not None and cfg.limit < 18 else 2  # 9 probes per trial
    pc = ProbeConfig(lengths=lengths, depths=(0.0, 0.5, 1.0), trials=trials, scoring="exact",
                     filler="generated", batch_size=backend.batch_size, out=cfg.out)
    res = evaluate_retrieval(backend.model, backend.tokenizer, name, pc, progress=False)
    rows = res["records"]
    correct = [float(bool(r["exact"])) for r in rows]
    from qwen25.eval.tasks.base import mean_stderr

    acc = sum(correct) / len(correct)
    return {"metrics": {"acc": {"value": acc, "stderr": mean_stderr(correct)}}, "primary": "acc",
            "n": len(correct), "num_fewshot": 0, "kind": "probe",
            "description": f"{name} retrieval at {list(lengths)} tokens"}, rows


def run_probe(backend, name: str, cfg) -> tuple[dict, list[dict]]:
    if getattr(backend, "kind", None) != "local":
        raise UserError(f"the {name} probe needs the model in this process; drop --server for it")
    start = time.monotonic()
    entry, rows = _bpb(backend, cfg) if name == "bpb" else _retrieval(backend, name, cfg)
    entry["seconds"] = time.monotonic() - start
    return entry, rows
