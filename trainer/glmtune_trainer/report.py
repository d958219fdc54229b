"""A run's training report: one self-contained report.html (curves as embedded PNGs, no scripts, no network).

It reads only what a run leaves on disk: the metrics log (logs/metrics.jsonl), the built records' manifest
(records/manifest.json: length histogram, truncation, packing), the checkpoint's run.json and weights (method,
trainable parameters), spec.yaml when `glmtune run` wrote one, and the export's glmtune-export.json and files.
The trainer's export writes it into the export (so it is listed in the manifest and uploaded with it);
`glmtune report WORKDIR` rebuilds it. Torch-free: matplotlib's Agg backend draws the curves.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

from glmtune import storage
from glmtune.errors import InvalidInputError
from glmtune.export_format import EXPORT_FILE, REPORT_FILE

__all__ = ["REPORT_FILE", "collect", "register", "run_workdir", "summary_numbers", "write_report"]
METRICS_LOG = Path("logs") / "metrics.jsonl"
RECORDS_MANIFEST = Path("records") / "manifest.json"
CHECKPOINTS = "checkpoints"
_CSS = """body{font-family:system-ui,"Noto Sans CJK SC","Microsoft YaHei",sans-serif;margin:2rem auto;max-width:70rem;
padding:0 1rem;color:#1d232a}
h1{margin-bottom:.2rem}.sub{color:#5b6670;margin-top:0}table{border-collapse:collapse;margin:.5rem 0 1.5rem}
td,th{border-bottom:1px solid #dde3e8;padding:.3rem .8rem;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums}.figs{display:flex;flex-wrap:wrap;gap:1rem}
figure{margin:0}figcaption{font-size:.85rem;color:#5b6670}.none{color:#5b6670;font-style:italic}
pre{background:#f4f6f8;padding:.8rem;overflow:auto}code{font-size:.85rem}"""


def run_workdir(checkpoint_dir: Path) -> Path | None:
    """The work directory a checkpoint belongs to (WORKDIR/checkpoints/step-N), or None for a loose one."""
    workdir = Path(checkpoint_dir).resolve().parent.parent
    return workdir if (workdir / METRICS_LOG).is_file() else None


def final_checkpoint(workdir: Path) -> Path | None:
    """The newest complete checkpoint of a work directory."""
    from glmtune_trainer.checkpoint import list_checkpoints  # imports torch: only when a report is built

    found = list_checkpoints(Path(workdir) / CHECKPOINTS)
    return found[-1][1] if found else None


def read_log(workdir: Path | None) -> dict[str, list[dict[str, Any]]]:
    """Metrics records by kind, one per step (the last one wins: a resumed run logs the replayed steps again)."""
    by_kind: dict[str, dict[int, dict[str, Any]]] = {}
    path = None if workdir is None else Path(workdir) / METRICS_LOG
    if path is None or not path.is_file():
        return {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            by_kind.setdefault(record["kind"], {})[int(record["step"])] = record
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidInputError(f"not a metrics record ({exc})", where=f"{path}:{number}") from None
    return {kind: [steps[s] for s in sorted(steps)] for kind, steps in by_kind.items()}


def _number(value: Any) -> float:
    """A logged value as a float; the log writes non-finite floats as the strings "nan" / "inf"."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def count_parameters(directory: Path) -> int | None:
    """Elements of every tensor in the safetensors files of `directory` (None when there are none); a training
    checkpoint's weights file holds exactly the trained parameters."""
    from safetensors import safe_open

    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        with safe_open(str(path), framework="numpy") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                total += math.prod(handle.get_slice(name).get_shape())
    return total


def model_parameters(base_dir: Path) -> int | None:
    """Parameters of the float model a checkpoint directory describes, built on the meta device (no weights read,
    so a 6B base costs nothing; a stored-quantized base counts as its float original)."""
    from glmtune.modeling.checkpoint import parameters_on_meta
    from glmtune.modeling.checkpoint_config import family_of_config, model_classes, read_config_dict

    if not (Path(base_dir) / "config.json").is_file():
        return None
    raw = read_config_dict(Path(base_dir))
    config_class, model_class = model_classes(family_of_config(raw, where=str(Path(base_dir) / "config.json")))
    with parameters_on_meta():
        model = model_class(config_class.from_dict({**raw, "quantization_bit": 0}))
    return sum(p.numel() for p in model.parameters())


def trainable_parameters(checkpoint_dir: Path | None, run: dict[str, Any]) -> dict[str, Any]:
    """Trained parameters (the checkpoint holds exactly those) against the whole model's."""
    from glmtune_trainer.checkpoint import WEIGHTS_FILE

    if checkpoint_dir is None or not (Path(checkpoint_dir) / WEIGHTS_FILE).is_file():
        return {}
    trained = count_parameters(Path(checkpoint_dir)) or 0
    total = model_parameters(Path(str(run.get("base_model", ""))))
    if total is not None and run.get("method", {}).get("name") in ("lora", "adalora", "ptv2"):
        total += trained  # these methods add their trained weights beside the base's
    return {"trainable": trained, "total": total}


def collect(workdir: Path | None, checkpoint_dir: Path | None = None, export_dir: Path | None = None) -> dict:
    """Everything the report shows, read from the run's files; sections whose files are absent stay empty."""
    from glmtune_trainer.checkpoint import RUN_FILE, STATE_FILE

    workdir = None if workdir is None else Path(workdir)
    if checkpoint_dir is None and workdir is not None:
        checkpoint_dir = final_checkpoint(workdir)
    run = state = {}
    if checkpoint_dir is not None and (Path(checkpoint_dir) / RUN_FILE).is_file():
        run = storage.read_json_object(Path(checkpoint_dir) / RUN_FILE)
        state = storage.read_json_object(Path(checkpoint_dir) / STATE_FILE, where=str(checkpoint_dir))
    records = None
    if workdir is not None and (workdir / RECORDS_MANIFEST).is_file():
        records = storage.read_json_object(workdir / RECORDS_MANIFEST)
    spec_yaml = workdir / "spec.yaml" if workdir is not None else None
    export_info, export_files = {}, {}
    if export_dir is not None:
        export_dir = Path(export_dir)
        if (export_dir / EXPORT_FILE).is_file():
            export_info = storage.read_json_object(export_dir / EXPORT_FILE)
        if (export_dir / storage.MANIFEST_NAME).is_file():
            export_files = storage.read_manifest(export_dir)["files"]
        else:  # written before the manifest (by the export itself): sizes only
            export_files = {p.relative_to(export_dir).as_posix(): {"size": p.stat().st_size}
                            for p in sorted(export_dir.rglob("*")) if p.is_file() and p.name != REPORT_FILE}
    return {
        "workdir": str(workdir) if workdir else None, "checkpoint": str(checkpoint_dir) if checkpoint_dir else None,
        "export_dir": str(export_dir) if export_dir else None, "log": read_log(workdir), "run": run,
        "state": state, "records": records, "parameters": trainable_parameters(checkpoint_dir, run),
        "spec_yaml": spec_yaml.read_text(encoding="utf-8") if spec_yaml and spec_yaml.is_file() else None,
        "export_info": export_info, "export_files": export_files,
    }


def summary_numbers(data: dict) -> dict[str, float | int | None]:
    """The headline numbers, each straight from one logged value (tests compare them with the log)."""
    log = data["log"]
    train, evals, summaries = log.get("train", []), log.get("eval", []), log.get("summary", [])
    last_summary = summaries[-1] if summaries else {}
    rates = [r for r in (_number(t.get("tokens_per_s")) for t in train) if math.isfinite(r)]
    eval_losses = [_number(e["eval_loss"]) for e in evals if "eval_loss" in e]
    peak = last_summary.get("peak_memory_bytes")
    times = [r["time"] for records in log.values() for r in records if "time" in r]
    return {
        "step": train[-1]["step"] if train else data["state"].get("step"),
        "total_steps": data["run"].get("total_steps"),
        "final_loss": _number(train[-1]["loss"]) if train else None,
        "final_lr": _number(train[-1]["lr"]) if train and "lr" in train[-1] else None,
        "final_eval_loss": eval_losses[-1] if eval_losses else None,
        "best_eval_loss": min(eval_losses, key=lambda v: (math.isnan(v), v)) if eval_losses else None,
        "final_perplexity": _number(evals[-1]["perplexity"]) if evals and "perplexity" in evals[-1] else None,
        "trained_tokens": data["state"].get("tokens"),
        "median_tokens_per_s": statistics.median(rates) if rates else None,
        "steps_per_s": _number(last_summary["steps_per_s"]) if "steps_per_s" in last_summary else None,
        "skipped_steps": last_summary.get("skipped_steps", train[-1].get("skipped_steps") if train else None),
        "peak_memory_bytes": int(peak) if peak is not None else None,
        "peak_memory_device": last_summary.get("peak_memory_device"),
        "wall_seconds": max(times) - min(times) if len(times) > 1 else None,
    }


def _png(draw: Any, title: str, xlabel: str, ylabel: str) -> str:
    """One small figure drawn by `draw(axes)`, as a data: URI (PNG)."""
    from matplotlib.figure import Figure  # not pyplot: no global state, no display

    figure = Figure(figsize=(5.2, 3.0), dpi=100, layout="constrained")
    axes = figure.subplots()
    draw(axes)
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.grid(alpha=.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], _number(r[key])) for r in records if key in r]
    return [p[0] for p in points], [p[1] for p in points]


def figures(data: dict) -> list[tuple[str, str, str]]:
    """(id, caption, data URI) of every curve the log and the records allow."""
    train, evals = data["log"].get("train", []), data["log"].get("eval", [])
    out = []
    if train:
        def loss(axes: Any) -> None:
            axes.plot(*_series(train, "loss"), label="train loss", lw=1.2)
            if evals:
                axes.plot(*_series(evals, "eval_loss"), "o-", label="eval loss")
        out.append(("loss", "Loss per step (train) and per evaluation", _png(loss, "Loss", "step", "loss")))
    if evals and any("eval_loss" in e for e in evals):
        out.append(("eval_loss", "Held-out loss at each evaluation", _png(
            lambda axes: axes.plot(*_series(evals, "eval_loss"), "o-", color="C1"), "Eval loss", "step", "loss")))
    if any("lr" in t for t in train):
        out.append(("lr", "Learning rate (schedule incl. warmup)",
                    _png(lambda axes: axes.plot(*_series(train, "lr"), color="C2"), "Learning rate", "step", "lr")))
    if any("tokens_per_s" in t for t in train):
        out.append(("throughput", "Trained tokens per second, per logging window", _png(
            lambda axes: axes.plot(*_series(train, "tokens_per_s"), color="C3"), "Throughput", "step", "tokens/s")))
    histogram = (data["records"] or {}).get("stats", {}).get("length_histogram")
    if histogram and histogram.get("counts"):
        edges, counts = histogram["edges"], histogram["counts"]
        labels = [f"{lo + 1}-{hi}" if lo else f"1-{hi}" for lo, hi in zip(edges, edges[1:], strict=False)]
        out.append(("lengths", "Sequence lengths in tokens (built records)", _png(
            lambda axes: axes.bar(labels, counts, color="C4"), "Sequence lengths", "tokens", "sequences")))
    return out


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}g}" if abs(value) < 1e-3 and value else f"{value:,.{digits}f}"


def _bytes(value: int | None) -> str:
    if value is None:
        return "not recorded"
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.1f} MiB"


def _table(rows: list[tuple[str, str, str | None]]) -> str:
    """Rows of (label, shown value, data-metric name or None)."""
    cells = "".join(
        f"<tr><th>{html.escape(label)}</th><td class=num{f' data-metric={name}' if name else ''}>"
        f"{html.escape(value)}</td></tr>" for label, value, name in rows)
    return f"<table>{cells}</table>"


def _plain(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _none(text: str) -> str:
    return f"<p class=none>{html.escape(text)}</p>"


def render(data: dict, images: list[tuple[str, str, str]]) -> str:
    """The report as one HTML document."""
    run, numbers, stats = data["run"], summary_numbers(data), (data["records"] or {}).get("stats")
    name = run.get("spec_name") or (data["export_info"].get("run") or {}).get("spec_name") or "run"
    step = numbers["step"]
    parts = [f"<h1>Training report: {html.escape(str(name))}</h1><p class=sub>{html.escape(run.get('family', ''))} "
             f"{html.escape(run.get('method', {}).get('name', ''))} · step {_fmt(step)} of {_fmt(numbers['total_steps'])}"
             f" · written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}</p>", "<h2>Outcome</h2>"]
    parts.append(_table([
        ("Final training loss", _fmt(numbers["final_loss"]), "final_loss"),
        ("Final eval loss", _fmt(numbers["final_eval_loss"]), "final_eval_loss"),
        ("Best eval loss", _fmt(numbers["best_eval_loss"]), "best_eval_loss"),
        ("Final perplexity", _fmt(numbers["final_perplexity"], 2), "final_perplexity"),
        ("Final learning rate", _fmt(numbers["final_lr"]), "final_lr"),
        ("Trained tokens (labelled)", _fmt(numbers["trained_tokens"]), "trained_tokens"),
        ("Throughput, median tokens/s", _fmt(numbers["median_tokens_per_s"], 1), "median_tokens_per_s"),
        ("Steps per second", _fmt(numbers["steps_per_s"], 3), "steps_per_s"),
        ("Peak memory", _bytes(numbers["peak_memory_bytes"]) + (
            f" ({numbers['peak_memory_device']})" if numbers["peak_memory_device"] else ""), "peak_memory"),
        ("Skipped (non-finite) steps", _fmt(numbers["skipped_steps"]), "skipped_steps"),
        ("Wall time, first to last logged record",
         "—" if numbers["wall_seconds"] is None else f"{numbers['wall_seconds']:.1f} s", "wall_seconds"),
    ]) if data["log"] else _none("No metrics log (logs/metrics.jsonl) was found."))
    parts.append("<h2>Curves</h2><div class=figs>" + "".join(
        f"<figure><img id=fig-{key} alt='{html.escape(caption)}' src='{uri}'><figcaption>{html.escape(caption)}"
        "</figcaption></figure>" for key, caption, uri in images) + "</div>")
    parts.append("<h2>Data</h2>")
    if stats:
        strategy = data["records"].get("strategy", "")
        per_sequence = stats["windows"] / stats["sequences"] if stats.get("sequences") else None
        parts.append(_table([
            ("Samples", _fmt(stats["samples"]), "samples"), ("Sequences", _fmt(stats["sequences"]), "sequences"),
            ("Strategy", strategy, None), ("Windows per sequence", _fmt(per_sequence, 2), "windows_per_sequence"),
            ("Tokens / trained (labelled) tokens", f"{_fmt(stats['tokens'])} / {_fmt(stats['trained_tokens'])}",
             None),
            ("Truncated samples", f"{_fmt(stats['truncated'])} ({stats['truncated_share']:.1%})", "truncated"),
            ("Mean / longest sequence", f"{stats['mean_length']:.1f} / {stats['max_length_seen']}", None),
            ("Packing efficiency (tokens / sequences × max length)",
             f"{stats['padding_efficiency_pad_to_max']:.1%}", "packing_efficiency"),
            (f"Padding efficiency (batches of {stats['padding_efficiency_batch_size']}, padded to the longest)",
             f"{stats['padding_efficiency']:.1%}", "padding_efficiency"),
            ("Invalid records skipped", _fmt(data["records"].get("invalid", {}).get("records")), None),
        ]))
    else:
        parts.append(_none("No built records (records/manifest.json) in the work directory."))
    parts.append("<h2>Method</h2>")
    if run:
        method = run.get("method", {})
        settings = method.get(method.get("name", ""), None) or {}
        params = data["parameters"]
        share = (f" of {_fmt(params['total'])} ({params['trainable'] / params['total']:.3%})"
                 if params.get("total") else "")
        parts.append(_table([("Method", method.get("name", "?"), "method"),
                             ("Trainable parameters", f"{_fmt(params.get('trainable'))}{share}", "trainable"),
                             ("Base model", str(run.get("base_uri") or run.get("base_model")), None),
                             ("Dtype / quantization", f"{run.get('dtype')} / {run.get('quantization_bits') or 'none'}",
                              None)]
                            + [(f"{method.get('name')}.{key}", _plain(value), None)
                               for key, value in settings.items()]))
    else:
        parts.append(_none("No checkpoint (run.json) found."))
    parts.append("<h2>Export</h2>")
    if data["export_info"] or data["export_files"]:
        info = data["export_info"]
        parts.append(_table([(key, _plain(info[key]), None) for key in (
            "kind", "family", "template", "method", "base_model", "quantization_bit", "created", "run", "metrics")
            if key in info]))
        rows = "".join(f"<tr><td><code>{html.escape(path)}</code></td><td class=num>{entry.get('size', 0):,}</td>"
                       f"<td><code>{html.escape(entry.get('sha256', '—'))}</code></td></tr>"
                       for path, entry in sorted(data["export_files"].items()))
        parts.append(f"<p>{html.escape(str(data['export_dir']))}</p><table id=export-files><tr><th>file</th>"
                     f"<th>bytes</th><th>sha256</th></tr>{rows}</table>")
    else:
        parts.append(_none("No export was given (glmtune report WORKDIR --export DIR)."))
    if data["spec_yaml"]:
        parts.append(f"<h2>Spec</h2><details><summary>spec.yaml</summary><pre>{html.escape(data['spec_yaml'])}"
                     "</pre></details>")
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>glmtune report: {html.escape(str(name))}"
            f"</title><style>{_CSS}</style></head><body>{''.join(parts)}</body></html>\n")


def write_report(workdir: Path | None, out: Path, checkpoint_dir: Path | None = None,
                 export_dir: Path | None = None) -> Path:
    """Build the report of the run in `workdir` (its newest checkpoint unless `checkpoint_dir`) and write it to
    `out` atomically; `export_dir` adds the export's description and files."""
    data = collect(workdir, checkpoint_dir, export_dir)
    if not data["log"] and not data["run"]:
        raise InvalidInputError("no training run here: neither logs/metrics.jsonl nor a checkpoint with run.json",
                                where=str(workdir or checkpoint_dir))
    storage.atomic_write_bytes(Path(out), render(data, figures(data)).encode("utf-8"), mode=0o644)
    return Path(out)


def _local_export(workdir: Path) -> Path | None:
    """The local export recorded in WORKDIR/spec.yaml (written by `glmtune run`), when it exists."""
    import yaml

    spec = workdir / "spec.yaml"
    if not spec.is_file():
        return None
    uri = ((yaml.safe_load(spec.read_text(encoding="utf-8")) or {}).get("spec", {}).get("output", {}).get("uri"))
    if not uri or storage.is_s3_uri(uri):
        return None
    path = Path(str(uri).removeprefix("file://"))
    return path if path.is_dir() else None


def register(subparsers: argparse._SubParsersAction) -> None:
    """`glmtune report WORKDIR [--export DIR] [--out FILE]`."""
    parser = subparsers.add_parser(
        "report", help="(re)build a run's report.html: curves, data statistics, method, export",
        description="Write report.html for the training run in WORKDIR: loss / eval-loss / learning-rate curves, "
                    "data statistics, the method and its trainable parameters, throughput, peak memory and the "
                    "export's files.")
    parser.add_argument("workdir", help="the run's work directory (it holds logs/, checkpoints/, records/)")
    parser.add_argument("--export", help="export directory to describe (default: the local output.uri of "
                                         "WORKDIR/spec.yaml, when there is one)")
    parser.add_argument("--out", help="file to write (default: WORKDIR/report.html)")
    parser.set_defaults(func=_report_command)


def _report_command(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir)
    if not workdir.is_dir():
        raise InvalidInputError("not a directory", where=str(workdir))
    export_dir = Path(args.export) if args.export else _local_export(workdir)
    if export_dir is not None and not export_dir.is_dir():
        raise InvalidInputError("not a directory", where=f"--export {export_dir}")
    out = write_report(workdir, Path(args.out) if args.out else workdir / REPORT_FILE, export_dir=export_dir)
    print(f"wrote {out}")
    return 0
