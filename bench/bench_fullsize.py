"""Full-size ChatGLM2-6B on this CPU machine: load, one LoRA step on the int4 base, streaming merge-export,
resumable S3 upload (killed mid-upload, run again) and the verified download a server loads.

Each measurement runs in its own child process (its own peak RSS), in this order, handing files on through
`--work`: `load-fp16` / `load-int4` (bench/bench_fullsize_load.py's cold load, up to the first decode step, against a
cold file read), `lora-step` (the trainer's own `train_spec`: base quantized to int4 at load, LoRA r 8, one
packed 256-token row, one optimizer step, checkpoint), `merge-export` (trainer/glmtune_trainer/merge_stream.py
folds that LoRA into the fp16 base as bf16, 2 GB shards), `upload` (a first upload SIGKILLed after
`--kill-after-parts` parts, then a second run: what it re-sends), `download` (`storage.fetch` with the
manifest required, then `glmtune.load_model` of it). S3 is moto's server on 127.0.0.1 in a process of its
own, started through bench/bench_fullsize_moto.py: stock moto deep-copies every stored object (a new spooled
temp file each, kept alive by its instance tracking) whenever the bucket is listed, so the upload's and the
download's listings left ~3x the export on disk and the full-size download never fitted; the launcher makes
that listing copy-free (its docstring has the details). moto spools objects to disk but assembles a completed
multipart object in memory (its peak RSS is reported apart, with the bytes it holds on disk after the upload
and after the download). The run stops itself (kills moto and the measurement) when the work disk gets below
`--min-free-gb`. Disk needed: the 11.6 GiB export, moto's copy of it, then the download in place of the
export (~25 GiB at the peak). Full-size runs take `flock /tmp/glmtune-fullsize.lock`; ~20 minutes; the work
folder is deleted at the end (the checkpoint cache in ~/.cache/glmtune-bench stays).

    flock /tmp/glmtune-fullsize.lock python bench/bench_fullsize.py --work /tmp/fullsize-bench
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from results import add_worker_arguments, record, run_workers

GIB = 1 << 30
LAYOUT = "chatglm2-6b"
BUCKET = "fullsize-bench"
_KILLED_UPLOAD = """
import os, signal, sys
from glmtune import storage
client = storage.s3_client()
acknowledged = []
def after_part(**kwargs):
    acknowledged.append(1)
    if len(acknowledged) == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
client.meta.events.register("after-call.s3.UploadPart", after_part)
storage.upload_dir(sys.argv[1], sys.argv[2], client=client)
"""


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024


def _folder() -> Path:
    """The cached full-size checkpoint (`--layers N`: the same layout cut to N layers, for a quick check)."""
    import fullsize

    layers = int(os.environ.get("GLMTUNE_BENCH_LAYERS") or 0)
    return fullsize.write_layout(LAYOUT, overrides={"num_layers": layers} if layers else None)


def run_load(quantize: int | None) -> dict[str, Any]:
    """bench/bench_fullsize_load.py's measurement: cold file read, then a cold load_model (up to the first decode step)
    in a fresh process."""
    from bench_fullsize_load import measure_load

    return measure_load(_folder(), "float16", quantize)


def _long_samples(path: Path) -> Path:
    """Real Chinese text (alpaca_zh answers joined) in samples of ~10 windows each, so that a training row is
    a full `--tokens` window (truncation spills a long answer into windows of exactly that length)."""
    shared = Path(os.environ.get("GLMTUNE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    records = json.loads((shared / "data" / "alpaca_zh_0-3252.json").read_text(encoding="utf-8"))
    answers = [r["output"] for r in records if r.get("output")]
    with path.open("w", encoding="utf-8") as out:
        for i in range(8):
            sample = {"instruction": records[i]["instruction"], "input": "", "output": "".join(answers[i * 12:(i + 1) * 12])}
            out.write(json.dumps(sample, ensure_ascii=False) + "\n")
    return path


def run_lora_step(args: argparse.Namespace) -> dict[str, Any]:
    """One LoRA r8 optimizer step over the int4 (quantized at load) base through `train_spec`, 256 tokens."""
    from glmtune_trainer.run import train_spec
    from glmtune_trainer.seam import prepare

    from glmtune.spec import spec_from_mapping

    work = Path(args.work) / "train"
    shutil.rmtree(work, ignore_errors=True)
    data = _long_samples(Path(args.work) / "long-samples.jsonl")
    mapping = {"metadata": {"name": "fullsize-lora"}, "spec": {
        "model": {"uri": str(_folder()), "quantization": {"bits": 4, "backend": "glmtune"}},
        "data": {"sources": [str(data)], "maxLength": args.tokens, "strategy": "truncation"},
        "method": {"name": "lora", "lora": {"r": 8, "dropout": 0.0}},
        "training": {"maxSteps": 2, "batchSize": 1, "precision": "bf16", "logEverySteps": 1,
                     "evaluation": {"everyEpoch": False}, "checkpoint": {"everySteps": 1}},
        "output": {"uri": str(Path(args.work) / "unused-export"), "export": "adapter"},
    }}
    events: list[tuple[str, dict[str, Any]]] = []
    spec = spec_from_mapping(mapping, "bench")
    start = time.perf_counter()
    result = train_spec(spec, work, stop_after=1, on_event=lambda kind, step, values: events.append((kind, values)))
    total = time.perf_counter() - start
    peak = peak_gib()
    train = next(values for kind, values in events if kind == "train")
    # the step's row, from the same prepared work dir: tokens_per_s counts its non-padding tokens
    batch = next(prepare(spec, work).source.micro_batches(0, 0))
    real = int((batch["segment_ids"] >= 0).sum()) if "segment_ids" in batch else int(batch["attention_mask"].sum()) \
        if batch.get("attention_mask") is not None and batch["attention_mask"].dim() == 2 else batch["input_ids"].numel()
    (Path(args.work) / "lora.json").write_text(json.dumps({"checkpoint": str(result.checkpoint_dir)}))
    return {"total_s": total, "step_s": real / train["tokens_per_s"], "tokens": real,
            "labelled": result.metrics["tokens"], "loss": train["loss"], "peak_rss_gib": peak}


def run_merge(args: argparse.Namespace) -> dict[str, Any]:
    """The LoRA of `lora-step` merged into the fp16 base, streamed into bf16 shards of <= 2 GB."""
    from glmtune_trainer.merge_stream import write_merged
    from safetensors import safe_open

    checkpoint = Path(json.loads((Path(args.work) / "lora.json").read_text())["checkpoint"])
    out = Path(args.work) / "merged"
    start = time.perf_counter()
    names = write_merged(checkpoint, out)
    seconds = time.perf_counter() - start
    for name in ("tokenizer.model", "tokenizer_config.json"):  # what a server needs next to the weights
        shutil.copyfile(_folder() / name, out / name)
    weights = 0
    for name in names:
        with safe_open(str(out / name), "pt") as handle:
            weights += sum(_nbytes(handle, key) for key in handle.keys())
    largest = max((out / name).stat().st_size for name in names)
    return {"seconds": seconds, "shards": len(names), "largest_shard_gb": largest / 1e9, "weights_gib": weights / GIB,
            "peak_rss_gib": peak_gib()}


def _nbytes(handle: Any, key: str) -> int:
    piece = handle.get_slice(key)
    count = 1
    for size in piece.get_shape():
        count *= size
    return count * {"BF16": 2, "F16": 2, "F32": 4, "I8": 1}[piece.get_dtype()]


def run_upload(args: argparse.Namespace) -> dict[str, Any]:
    """A first upload SIGKILLed after `--kill-after-parts` parts, then the run that finishes it."""
    from glmtune import storage

    merged, uri = Path(args.work) / "merged", f"s3://{BUCKET}/merged"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _KILLED_UPLOAD, str(merged), uri, str(args.kill_after_parts)],
                          capture_output=True, text=True)
    killed_s = time.perf_counter() - start
    if done.returncode != -signal.SIGKILL:
        raise RuntimeError(f"the upload to kill ended with {done.returncode}:\n{done.stderr[-3000:]}")
    killed_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 / 1024
    incomplete = not storage.check_complete(uri).complete
    client = storage.s3_client()
    sent: list[int] = []
    client.meta.events.register("provide-client-params.s3.UploadPart", lambda params, **kw: sent.append(len(params["Body"])))
    start = time.perf_counter()
    result = storage.upload_dir(merged, uri, client=client)
    resume_s = time.perf_counter() - start
    total = sum(entry["size"] for entry in result["manifest"]["files"].values())
    return {"killed_s": killed_s, "killed_peak_rss_gib": killed_peak, "incomplete_after_kill": incomplete,
            "resume_s": resume_s, "parts_sent": result["parts_sent"], "parts_reused": result["parts_reused"],
            "part_bytes_resent_gib": sum(sent) / GIB, "skipped": result["skipped"], "uploaded": result["uploaded"],
            "total_gib": total / GIB, "complete": storage.check_complete(uri).complete, "peak_rss_gib": peak_gib()}


def run_download(args: argparse.Namespace) -> dict[str, Any]:
    """`storage.fetch(require_manifest=True)` into a fresh cache (checksums taken while writing), then load."""
    import glmtune
    from glmtune import storage

    shutil.rmtree(Path(args.work) / "merged", ignore_errors=True)  # uploaded: make room for the download
    start = time.perf_counter()
    local = storage.fetch(f"s3://{BUCKET}/merged", require_manifest=True)
    fetch_s = time.perf_counter() - start
    peak_fetch = peak_gib()
    start = time.perf_counter()
    model = glmtune.load_model(str(local), dtype="bfloat16")
    load_s = time.perf_counter() - start
    layers = model.config.num_layers
    del model
    return {"fetch_s": fetch_s, "peak_rss_fetch_gib": peak_fetch, "load_s": load_s, "layers": layers,
            "peak_rss_gib": peak_gib()}


WORKERS = {"load-fp16": lambda args: run_load(None), "load-int4": lambda args: run_load(4),
           "lora-step": run_lora_step, "merge-export": run_merge, "upload": run_upload, "download": run_download}


def report(args: argparse.Namespace, results: dict[str, Any], moto_peak: float,
           disk: dict[str, Any]) -> str:
    """Markdown tables with issue 12's targets next to each figure."""
    from bench_fullsize_load import load_report

    folder = _folder()
    size = f"cut to {args.layers} layers" if args.layers else "full size"
    lines = [f"ChatGLM2-6B random weights, {size} ({folder}), {os.environ.get('OMP_NUM_THREADS', '2')} threads; "
             "each measurement in its own child process", ""]
    for name, quantize in (("load-fp16", None), ("load-int4", 4)):
        if name in results:
            lines += [f"### {name}", "", load_report(LAYOUT, folder, "float16", quantize, results[name]), ""]
    rows = ["| measurement | seconds | peak RSS GiB | target | detail |", "|---|---|---|---|---|"]
    if "lora-step" in results:
        r = results["lora-step"]
        rows.append(f"| LoRA r8 step, int4 base, {r['tokens']} tokens ({r['labelled']} labelled) | {r['step_s']:.1f} (whole run {r['total_s']:.0f}) "
                    f"| {r['peak_rss_gib']:.2f} | <= 8 GiB ({'met' if r['peak_rss_gib'] <= 8 else 'NOT met'}) "
                    f"| loss {r['loss']:.3f}; run = load + quantize + data + step + checkpoint |")
    if "merge-export" in results:
        r = results["merge-export"]
        bound = 1.2 * r["weights_gib"]
        rows.append(f"| streaming merge-export (bf16) | {r['seconds']:.0f} | {r['peak_rss_gib']:.2f} | <= 1.2x the bf16 "
                    f"weights = {bound:.2f} GiB ({'met' if r['peak_rss_gib'] <= bound else 'NOT met'}) | {r['shards']} "
                    f"shards, largest {r['largest_shard_gb']:.2f} GB (<= 2 GB), {r['weights_gib']:.2f} GiB of weights |")
    if "upload" in results:
        r = results["upload"]
        rows.append(f"| upload, SIGKILLed after {args.kill_after_parts} parts | {r['killed_s']:.0f} | "
                    f"{r['killed_peak_rss_gib']:.2f} | incomplete after the kill: {r['incomplete_after_kill']} | "
                    f"no manifest, so not complete |")
        rows.append(f"| upload run again (resumes) | {r['resume_s']:.0f} | {r['peak_rss_gib']:.2f} | complete: "
                    f"{r['complete']} | {len(r['skipped'])} files skipped, {r['parts_reused']} parts reused, "
                    f"{r['parts_sent']} sent ({r['part_bytes_resent_gib']:.2f} of {r['total_gib']:.2f} GiB) |")
    if "download" in results:
        r = results["download"]
        rows.append(f"| verified download (fetch, manifest required) | {r['fetch_s']:.0f} | {r['peak_rss_fetch_gib']:.2f} "
                    f"| checksums match | then load_model {r['load_s']:.1f} s, peak {r['peak_rss_gib']:.2f} GiB |")
    if len(rows) > 2:
        held = ", ".join(f"{v:.2f} GiB after {k}" for k, v in disk["spool_after"].items())
        lines += rows + ["", f"moto server (its own process): peak RSS {moto_peak:.2f} GiB; objects and parts it "
                         f"spools on disk (unlinked files): {held or 'none'}, peak {disk['spool_peak']:.2f} GiB; "
                         f"lowest free space on the work disk during the run {disk['lowest_free']:.1f} GB"]
    return "\n".join(lines)


def _start_moto() -> tuple[subprocess.Popen, str]:
    """moto's S3 server (bench/bench_fullsize_moto.py) on a free port of 127.0.0.1, in its own process;
    returns it and its endpoint."""
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launcher = Path(__file__).resolve().parent / "bench_fullsize_moto.py"
    process = subprocess.Popen([sys.executable, str(launcher), "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=2)
            return process, endpoint
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("moto's server did not start")


def _peak_of(pid: int) -> float:
    """A live process's peak resident memory (VmHWM) in GiB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024 / 1024


class _DiskGuard(threading.Thread):
    """Samples free space on the work folder's disk and moto's spooled bytes every second; below `min_free`
    bytes it kills moto and every measurement process (moto's spool files are unlinked, so that gives the
    space back at once) and the run ends with an error instead of a full shared disk."""

    def __init__(self, folder: Path, min_free: int, moto_pid: int) -> None:
        super().__init__(daemon=True)
        self.folder, self.min_free, self.moto_pid = folder, min_free, moto_pid
        self.lowest_free, self.moto_peak_spool, self.tripped = shutil.disk_usage(folder).free, 0, False
        self._done = threading.Event()

    def run(self) -> None:
        from bench_fullsize_moto import spooled_bytes

        while not self._done.wait(1.0):
            free = shutil.disk_usage(self.folder).free
            self.lowest_free = min(self.lowest_free, free)
            try:
                self.moto_peak_spool = max(self.moto_peak_spool, spooled_bytes(self.moto_pid))
            except OSError:
                pass  # moto is gone
            if free < self.min_free and not self.tripped:
                self.tripped = True
                for pid in _descendants(os.getpid()):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=5)


def _descendants(pid: int) -> list[int]:
    """Every live process below `pid` (children first found through /proc's parent links)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stat:
                    ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/glmtune-fullsize-bench"))
    parser.add_argument("--tokens", type=int, default=256, help="tokens in the LoRA step's packed row")
    parser.add_argument("--kill-after-parts", type=int, default=60, help="parts the first upload sends before SIGKILL")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (merged export, download)")
    parser.add_argument("--layers", type=int, default=0, help="cut the model to this many layers (a quick check)")
    parser.add_argument("--min-free-gb", type=float, default=8.0,
                        help="stop the run (kill moto and the measurement) when the work disk has less free space")
    add_worker_arguments(parser, WORKERS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if args.layers:
        os.environ["GLMTUNE_BENCH_LAYERS"] = str(args.layers)
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args), default=str))
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    # moto runs in a process of its own: a child started from a process that grew big (moto assembling
    # 2 GB objects) would report that process's peak as its own (vfork + exec keep the high-water mark)
    moto, endpoint = _start_moto()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
           "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1", "GLMTUNE_CACHE": str(args.work / "cache")}
    os.environ.update({k: env[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                           "AWS_DEFAULT_REGION")})
    from bench_fullsize_moto import spooled_bytes

    from glmtune import storage

    storage.s3_client().create_bucket(Bucket=BUCKET)
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--no-record", "--keep")]
    guard = _DiskGuard(args.work, int(args.min_free_gb * 1e9), moto.pid)
    guard.start()
    results: dict[str, Any] = {}
    spool: dict[str, float] = {}
    try:
        for name in args.only or list(WORKERS):
            try:
                results.update(run_workers(__file__, [name], forwarded, env))
            except SystemExit:
                if guard.tripped:
                    raise SystemExit(f"stopped during {name}: less than {args.min_free_gb} GB free on "
                                     f"{args.work}'s disk") from None
                raise
            if name in ("upload", "download"):
                spool[name] = spooled_bytes(moto.pid) / GIB
        guard.stop()
        disk = {"spool_after": spool, "spool_peak": guard.moto_peak_spool / GIB, "lowest_free": guard.lowest_free / 1e9}
        text = report(args, results, _peak_of(moto.pid), disk)
    finally:  # moto first: a moto left running keeps its spooled objects on disk
        moto.terminate()
        moto.wait(timeout=60)
        guard.stop()
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    print("\n" + text)
    if not args.no_record:
        record("bench_fullsize.py", text, forwarded)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
