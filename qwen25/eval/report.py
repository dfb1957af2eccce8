"""The report card: markdown tables and PNG charts of one or several evaluation results.

`write_report(results, out)` writes report.md (one row per task: primary metric with its
standard error, the other metrics, n, shots, runtime, and the contamination column when a
training manifest was given) and scores.png (primary metric per task, with +-1 stderr
bars). `compare(results_list, names, out)` puts several runs side by side (before/after
SFT, DPO, GRPO, quantization): compare.md with one column per run and the difference to
the first, and compare.png as grouped bars.
"""

from __future__ import annotations

from pathlib import Path


def _fmt(v, pct: bool = True) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}" if pct else f"{v:.4f}"


def _is_pct(entry: dict) -> bool:
    return not entry.get("lower_is_better")


def _n(e: dict) -> str:
    """Items evaluated, and how many the scorer could judge when that is fewer."""
    return f"{e['n_scored']} of {e['n']} scored" if "n_scored" in e else str(e["n"])


def task_rows(results: dict) -> list[list[str]]:
    rows = []
    for name, e in results["tasks"].items():
        m = e["metrics"]
        prim = m.get(e["primary"], {})
        pct = _is_pct(e)
        others = ", ".join(f"{k} {_fmt(v['value'], pct)}" for k, v in m.items() if k != e["primary"])
        cont = e.get("contamination")
        rows.append([name, e["primary"], f"{_fmt(prim.get('value'), pct)} ± {_fmt(prim.get('stderr'), pct)}",
                     others or "-", _n(e), str(e.get("num_fewshot", "-")), f"{e.get('seconds', 0):.1f}",
                     f"{100 * cont['fraction']:.1f}% ({cont['items']})" if cont else "-"])
    return rows


def markdown(results: dict) -> str:
    model = results.get("model", {})
    cfg = results.get("config", {})
    lines = [f"# Report card: {model.get('name', model.get('path', '?'))}", "",
             f"- model: `{model.get('path', '?')}` (sha256 {str(model.get('sha256', '?'))[:16]}…, "
             f"backend {model.get('backend', '?')})",
             f"- prompts: {'chat template' if cfg.get('chat') else 'base (plain text)'}; "
             f"limit {cfg.get('limit') or 'none'}; samples {cfg.get('samples', 1)}, "
             f"temperature {cfg.get('temperature', 0)}"]
    if results.get("sandbox"):
        sb = results["sandbox"]
        lines.append(f"- code sandbox: network {sb.get('network')}, user {sb.get('user')}")
    lines += ["", "Scores in % (bits per byte as is) ± one standard error of the mean.", "",
              "| task | metric | score | other metrics | n | shots | seconds | contaminated |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += ["| " + " | ".join(r) + " |" for r in task_rows(results)]
    return "\n".join(lines) + "\n"


def _bar_chart(labels: list[str], series: dict[str, list[tuple[float, float]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = max(1, len(series))
    width = 0.8 / k
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(labels) * k ** 0.5 + 2), 3.6))
    for j, (name, vals) in enumerate(series.items()):
        xs = [i + (j - (k - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, [v for v, _ in vals], width, yerr=[e for _, e in vals], capsize=3, label=name)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.set_ylabel("score (%)")
    ax.set_title(title)
    if k > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _primary(e: dict) -> tuple[float, float]:
    m = e["metrics"].get(e["primary"], {})
    scale = 100 if _is_pct(e) else 1
    return scale * (m.get("value") or 0.0), scale * (m.get("stderr") or 0.0)


def write_report(results: dict, out: str | Path) -> list[Path]:
    out = Path(out)
    md = out / "report.md"
    text = markdown(results)
    names = list(results["tasks"])
    paths = [md]
    if names:
        png = out / "scores.png"
        _bar_chart(names, {"score": [_primary(results["tasks"][n]) for n in names]}, png,
                   "primary metric per task (±1 s.e.)")
        text += "\n![scores](scores.png)\n"
        paths.append(png)
    md.write_text(text)
    return paths


def compare(results_list: list[dict], names: list[str], out: str | Path) -> tuple[str, list[Path]]:
    """Side-by-side table (and chart) of several runs; the last column is the change of the
    last run against the first, in points."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [t for t in results_list[0]["tasks"] if all(t in r["tasks"] for r in results_list)]
    header = "| task | metric | " + " | ".join(names) + " | Δ last-first |"
    lines = ["# Comparison", "", header, "|" + " --- |" * (len(names) + 3)]
    series: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for t in tasks:
        entries = [r["tasks"][t] for r in results_list]
        vals = [_primary(e) for e in entries]
        for n, v in zip(names, vals):
            series[n].append(v)
        cells = [f"{v:.2f} ± {s:.2f}" for v, s in vals]
        lines.append(f"| {t} | {entries[0]['primary']} | " + " | ".join(cells) + f" | {vals[-1][0] - vals[0][0]:+.2f} |")
    only = sorted({t for r in results_list for t in r["tasks"]} - set(tasks))
    if only:
        lines += ["", f"Not in every run (left out): {', '.join(only)}"]
    text = "\n".join(lines) + "\n"
    paths = []
    if tasks:
        png = out / "compare.png"
        _bar_chart(tasks, series, png, "primary metric per task")
        text += "\n![compare](compare.png)\n"
        paths.append(png)
    md = out / "compare.md"
    md.write_text(text)
    return text, [md, *paths]
