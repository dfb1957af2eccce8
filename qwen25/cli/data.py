"""`qwen25 data fetch | prepare | stats`: built-in corpora, the data pipeline, dataset summaries.

  qwen25 data fetch                              download / verify the built-in corpora
  qwen25 data prepare --builtin --out out/data   built-in corpora -> shards + manifest + card
  qwen25 data prepare --config data.json         a `DataConfig` file (JSON or TOML)
  qwen25 data prepare --source web=crawl/*.jsonl.gz,domain=web --eval-set he=HumanEval.jsonl.gz,fields=prompt
  qwen25 data stats out/data [--verify]          counts, mixture and drops of a prepared dataset

Flags are applied on top of the config file (and of `--builtin`), then `--set key.sub=value`
overrides, so every field of `DataConfig` is reachable from the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from qwen25.errors import UserError


def _config_help() -> str:
    from qwen25.data import config as C

    lines = ["config keys (JSON/TOML file or --set key.sub=value):"]
    for prefix, cls in (("", C.DataConfig), ("sources[].", C.SourceConfig), ("filters.", C.FilterConfig),
                        ("quality.", C.QualityConfig), ("dedup.", C.DedupConfig),
                        ("decontam.", C.DecontamConfig), ("decontam.eval_sets[].", C.EvalSetConfig),
                        ("mix.", C.MixConfig)):
        comments = C.field_comments(cls)
        for f in dataclasses.fields(cls):
            default = "" if dataclasses.is_dataclass(f.default) else (
                f" (default {f.default!r})" if f.default is not dataclasses.MISSING else "")
            lines.append(f"  {prefix}{f.name}: {comments.get(f.name, '')}{default}")
    return "\n".join(lines)


def configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    f = sub.add_parser("fetch", help="download and verify the built-in corpora into the cache")
    f.add_argument("--cache", default=None, help="cache folder (default: $QWEN25_DATA or data_cache/)")
    r = sub.add_parser("prepare", help="run the pipeline: shards, manifest.json and card.md",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_config_help())
    r.add_argument("--config", help="DataConfig file (.json or .toml)")
    r.add_argument("--builtin", action="store_true", help="use the built-in corpora (runs fetch if needed)")
    r.add_argument("--source", action="append", default=[], metavar="NAME=PATH[,key=value...]",
                   help="add a source; keys: domain, format, text_field, id_field, kind, chunk_chars")
    r.add_argument("--eval-set", action="append", default=[], metavar="NAME=PATH[,fields=a+b]",
                   help="add an evaluation set to decontaminate against")
    r.add_argument("--mix", action="append", default=[], metavar="DOMAIN=WEIGHT",
                   help="target token share of a domain (give every domain one)")
    r.add_argument("--tokenizer", help="tokenizer: 'qwen2.5' or a tokenizer folder")
    r.add_argument("--out", help="output folder")
    r.add_argument("--workers", type=int, help="worker processes (0: none)")
    r.add_argument("--val-fraction", type=float, help="fraction of documents held out")
    r.add_argument("--no-dedup", action="store_true", help="skip exact and near deduplication")
    r.add_argument("--no-filters", action="store_true", help="skip the heuristic rules")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. dedup.threshold=0.8 (VALUE is JSON or a string)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    s = sub.add_parser("stats", help="summarise a prepared dataset")
    s.add_argument("manifest", help="manifest.json or the folder holding it")
    s.add_argument("--verify", action="store_true", help="also check every shard's sha256")
    s.add_argument("--json", action="store_true", help="print the counts as JSON")


def _options(spec: str, what: str) -> tuple[str, str, dict[str, str]]:
    head, *opts = spec.split(",")
    name, sep, path = head.partition("=")
    if not sep or not name or not path:
        raise UserError(f"{what} {spec!r} must look like NAME=PATH[,key=value...]")
    extra = {}
    for o in opts:
        k, sep, v = o.partition("=")
        if not sep:
            raise UserError(f"{what} option {o!r} must look like key=value")
        extra[k] = v
    return name, path, extra


def build_config(args: argparse.Namespace):
    """The `DataConfig` of a `prepare` command line (file, then flags, then --set)."""
    from qwen25.data.builtin import builtin_config, fetch
    from qwen25.data.config import DataConfig, apply_override, from_dict, read_config_file, to_dict

    data = read_config_file(args.config) if args.config else {}
    if args.builtin:
        root = fetch(quiet=args.quiet)
        base = to_dict(builtin_config(root=root))
        data = {**{k: base[k] for k in ("sources", "decontam")}, **data}
    if not isinstance(data.get("sources", []), list):
        raise UserError(f"config key sources must be a list of sources, got {data['sources']!r:.60}")
    sources = list(data.get("sources", []))
    for spec in args.source:
        name, path, extra = _options(spec, "--source")
        row = {"name": name, "path": path, **extra}
        if "chunk_chars" in row:
            try:
                row["chunk_chars"] = int(row["chunk_chars"])
            except ValueError:
                raise UserError(f"--source {spec!r}: chunk_chars={row['chunk_chars']!r} must be an "
                                "integer >= 0 (characters per chunk)") from None
        sources.append(row)
    if sources:
        data["sources"] = sources
    if args.eval_set:
        dec = dict(data.get("decontam", {}))
        sets = list(dec.get("eval_sets", []))
        for spec in args.eval_set:
            name, path, extra = _options(spec, "--eval-set")
            row = {"name": name, "path": path}
            if "fields" in extra:
                row["fields"] = extra["fields"].split("+")
            sets.append(row)
        data["decontam"] = {**dec, "eval_sets": sets}
    if args.mix:
        weights = {}
        for spec in args.mix:
            d, sep, w = spec.partition("=")
            try:
                weights[d] = float(w)
            except ValueError:
                raise UserError(f"--mix {spec!r} must look like DOMAIN=WEIGHT") from None
        data["mix"] = {**data.get("mix", {}), "weights": weights}
    for key, value in (("tokenizer", args.tokenizer), ("out", args.out), ("num_workers", args.workers),
                       ("val_fraction", args.val_fraction)):
        if value is not None:
            data[key] = value
    if args.no_dedup:
        data["dedup"] = {**data.get("dedup", {}), "exact": False, "near": False}
    if args.no_filters:
        data["filters"] = {**data.get("filters", {}), "enabled": False}
    for assignment in args.set:
        apply_override(data, assignment)
    return from_dict(DataConfig, data)


def _stats(args: argparse.Namespace) -> int:
    from qwen25.data.manifest import load_manifest, verify

    m = load_manifest(args.manifest)
    if args.json:
        print(json.dumps({k: m[k] for k in ("counts", "mix", "splits", "timing")}, indent=1))
    else:
        print(f"{args.manifest}: tokenizer {m['tokenizer']['spec']}, EOS {m['eos_token_id']}, "
              f"{len(m['shards'])} shards")
        for split, info in m["splits"].items():
            bpt = info["bytes_per_token"]
            print(f"  {split}: {info['docs']:,} docs, {info['tokens']:,} tokens, {info['bytes']:,} bytes"
                  + (f", {bpt:.3f} bytes/token" if bpt else ""))
            for d, c in info["domains"].items():
                print(f"    {d}: {c['tokens']:,} tokens ({c['docs']:,} docs)")
        mix = m["mix"]
        print("  mixture (domain: before -> achieved" + (", target" if mix["target"] else "") + "):")
        for d in sorted(mix["before"]):
            t = f", target {mix['target'][d]:.3f}" if mix["target"] else ""
            print(f"    {d}: {mix['before'][d]:.3f} -> {mix['achieved'].get(d, 0.0):.3f}{t}")
        print("  dropped:")
        for reason, n in sorted(m["counts"]["drops"].items(), key=lambda kv: -kv[1]):
            print(f"    {reason}: {n:,}")
    if args.verify:
        bad = verify(m)
        if bad:
            print(f"checksum mismatch in {len(bad)} shard(s): {', '.join(bad)}", file=sys.stderr)
            return 1
        print(f"all {len(m['shards'])} shards match their sha256")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.action == "fetch":
        from pathlib import Path

        from qwen25.data.builtin import fetch

        fetch(Path(args.cache) if args.cache else None)
        return 0
    if args.action == "stats":
        return _stats(args)
    from qwen25.data.pipeline import prepare

    cfg = build_config(args)
    path = prepare(cfg, progress=not args.quiet)
    m = json.loads(path.read_text())
    train, val = m["splits"]["train"], m["splits"]["val"]
    print(f"wrote {path}: train {train['tokens']:,} tokens, val {val['tokens']:,} tokens, "
          f"{sum(m['counts']['drops'].values()):,} documents dropped (see {path.parent / 'card.md'})")
    return 0
