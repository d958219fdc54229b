"""`glmtune run SPEC`: the whole one-machine job in-process — model → data → train → export → serve.

The same `GLMFineTune` spec the operator takes runs here in stages, each announced on stderr: the base
model is created or fetched, the data set (local or `s3://`) becomes token records (reused when
unchanged), training runs in this process or under torchrun (`--nproc N`), and the export is checked
complete. `--serve` then serves it on 127.0.0.1 with the OpenAI API. Paths: relative `output.uri` and
`data.cache` resolve against the work directory; relative inputs (`data.sources`, `model.uri`) against the
current directory, as in every other command. Registration is torch-free; the handler imports the trainer.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmtune_trainer.seam import run_locations

from glmtune import storage
from glmtune.errors import GlmtuneError, InvalidInputError

WORKDIR_ENV = "GLMTUNE_WORKDIR"
PORT_ENV = "GLMTUNE_PORT"
DEFAULT_PORT = 8000
STAGES = 4
_ANY_ADDRESS = ("", "0.0.0.0", "::")


@dataclass(frozen=True)
class PipelineResult:
    """What a finished run produced: the export, how to reach it, and the training outcome."""

    workdir: Path
    export_uri: str
    export_kind: str
    model_name: str
    steps: int
    loss: float | None
    seconds: float


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `run` command."""
    run = subparsers.add_parser(
        "run", help="fine-tune and export (and optionally serve) as a spec says, on this machine",
        description="Run a GLMFineTune spec on this machine: create or fetch the base model, build the records, "
                    "train (one process, or N under torchrun), export to output.uri and optionally serve the "
                    f"result. A relative output.uri or data.cache lands in the work directory (--workdir, "
                    f"${WORKDIR_ENV}, default ./glmtune-runs/<spec name>); relative inputs are read from the "
                    "current directory. Re-running reuses the base model, the records and the last checkpoint.",
    )
    run.add_argument("spec", metavar="SPEC", help="GLMFineTune YAML file (full object or bare spec)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a spec field, e.g. --set training.maxSteps=100 (repeatable)")
    run.add_argument("--workdir", default=os.environ.get(WORKDIR_ENV),
                     help=f"folder for the base model, records, checkpoints, logs and a relative output.uri "
                          f"(default: ${WORKDIR_ENV} or ./glmtune-runs/<spec name>)")
    run.add_argument("--nproc", type=int, default=1,
                     help="training processes on this machine; more than 1 launches torchrun (default: 1)")
    run.add_argument("--serve", action="store_true",
                     help="after exporting, serve the model with the OpenAI API until Ctrl-C")
    run.add_argument("--host", default="127.0.0.1", help="address --serve listens on (default: 127.0.0.1)")
    run.add_argument("--port", type=int, default=os.environ.get(PORT_ENV, str(DEFAULT_PORT)),
                     help=f"port --serve listens on (default: ${PORT_ENV} or {DEFAULT_PORT})")
    run.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    """Handler of `glmtune run`."""
    from glmtune.spec import load_spec_file

    spec, workdir = run_locations(load_spec_file(args.spec, args.overrides), args.workdir)
    run_pipeline(spec, workdir, serve=args.serve, nproc=args.nproc, host=args.host, port=args.port)
    return 0


def run_pipeline(spec: Any, workdir: str | os.PathLike[str], serve: bool = False, nproc: int = 1,
                 host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> PipelineResult:
    """Run every stage of `spec` (a `GLMFineTune`) with `workdir` as the run's folder; with `serve`, block
    serving the export on host:port until interrupted. Returns what was produced."""
    started = time.monotonic()
    if nproc < 1:
        raise InvalidInputError(f"must be at least 1, got {nproc}", where="--nproc")
    spec, workdir = run_locations(spec, workdir)
    if serve:
        _check_port_free(host, port)
    workdir.mkdir(parents=True, exist_ok=True)
    storage.atomic_write_bytes(workdir / "spec.yaml", _spec_yaml(spec))
    _say(f"glmtune run {spec.name}: work directory {workdir}")

    from glmtune_trainer.seam import prepare

    stage = _Stage(1, "model", _describe_model(spec))
    data_stage: list[_Stage] = []

    def model_ready(kind: str, _step: int, base: dict[str, Any]) -> None:
        if kind == "model":
            stage.done(f"{base['family']} model, template {base['template']}: {base['path']}")
            data_stage.append(_Stage(2, "data", ", ".join(spec.spec.data.sources)))

    prepared = prepare(spec, workdir, world_size=nproc, on_event=model_ready)
    data_stage[0].done(_describe_records(prepared))
    stage = _Stage(3, "train", _describe_training(spec, prepared.steps_per_epoch, prepared.total_steps, nproc))
    last = _train(prepared, nproc)
    stage.done(f"step {last['step']}, loss {float(last['loss']):.4f}" if last else "no step was logged")
    stage = _Stage(4, "export", spec.spec.output.uri)
    info = _check_export(spec.spec.output.uri)
    stage.done(f"{info.kind} model ({info.family}), complete: glmtune-manifest.json present")
    result = PipelineResult(workdir=workdir, export_uri=spec.spec.output.uri, export_kind=info.kind,
                            model_name=spec.spec.serving.model_name or spec.name, steps=int(last.get("step", prepared.total_steps)),
                            loss=float(last["loss"]) if "loss" in last else None,
                            seconds=time.monotonic() - started)
    question = _first_question(spec.spec.data.sources, spec.spec.data.format)
    print(summary(result, question, host, port, serve), flush=True)
    if serve:
        _serve(spec, result, host, port)
    return result


def _spec_yaml(spec: Any) -> bytes:
    import yaml

    text = "# The spec `glmtune run` ran, after --set overrides and path resolution.\n"
    return (text + yaml.safe_dump(spec.to_manifest(), allow_unicode=True, sort_keys=False)).encode()


def _check_port_free(host: str, port: int) -> None:
    """Fail before hours of training when the port `--serve` needs is taken."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.bind((host, port))
    except OSError as exc:
        raise InvalidInputError(f"cannot listen on {host}:{port} ({exc.strerror}): choose another port with "
                                f"--port or ${PORT_ENV}", where="--port") from None


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class _Stage:
    """One announced stage: its header on stderr when made, its outcome and duration on `done`."""

    def __init__(self, number: int, name: str, what: str) -> None:
        _say(f"[{number}/{STAGES}] {name:<7}{what}")
        self.started = time.monotonic()

    def done(self, outcome: str) -> None:
        _say(f"{'':<13}{outcome} ({_duration(time.monotonic() - self.started)})")


def _duration(seconds: float) -> str:
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes}m{rest:02d}s" if minutes else f"{seconds:.1f}s"


def _describe_model(spec: Any) -> str:
    model = spec.spec.model
    if model.create is not None:
        tokenizer = f"the tokenizer of {model.create.tokenizer}" if model.create.tokenizer else "a tiny tokenizer"
        return f"create a random {model.create.size} {model.family} model with {tokenizer} (seed {model.create.seed})"
    return f"load {model.uri}"


def _describe_records(prepared: Any) -> str:
    stats = prepared.records_stats()
    text = (f"{stats['samples']} samples -> {stats['sequences']} sequences, {stats['tokens']} tokens "
            f"({stats['trained_tokens']} trained); records {'reused' if prepared.records_reused else 'built'}: "
            f"{prepared.records}")
    return text + (f"; {stats['invalid']} invalid records skipped" if stats["invalid"] else "")


def _describe_training(spec: Any, per_epoch: int, total: int, nproc: int) -> str:
    import torch

    training = spec.spec.training
    device = f"{torch.cuda.device_count()} GPU(s)" if torch.cuda.is_available() else "CPU"
    launch = f"{nproc} processes (torchrun)" if nproc > 1 else "1 process"
    return (f"method {spec.spec.method.name}, {total} steps ({per_epoch} per epoch), batch {training.batch_size}"
            f" x {training.gradient_accumulation_steps} accumulation, lr {training.learning_rate:g}, "
            f"{training.precision} on {device}, {launch}")


def _train(prepared: Any, nproc: int) -> dict[str, Any]:
    """Train (and export, as the trainer does at the end) in this process, or in `nproc` under torchrun;
    returns the last logged training record ({} when none was logged)."""
    if nproc == 1:
        from glmtune_trainer.run import train

        heard: list[dict[str, Any]] = []
        train(prepared, on_event=lambda kind, step, values: heard.append({"step": step, **values})
              if kind == "train" else None)
        return heard[-1] if heard else {}
    import subprocess

    from glmtune_trainer.distributed import free_port, torchrun_command
    from glmtune_trainer.metrics import read_metrics

    workdir = prepared.workdir
    launch = {"PET_NPROC_PER_NODE": str(nproc), "PET_NNODES": "1", "PET_NODE_RANK": "0",
              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    # Each process prepares again (the records and base model are found ready) and trains its rank.
    command = torchrun_command([str(workdir / "spec.yaml"), "--workdir", str(workdir)], launch)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    code = subprocess.call(command, env=env)
    if code != 0:
        raise GlmtuneError(f"training under torchrun failed with exit code {code} (see the messages above)")
    records = read_metrics(workdir / "logs", "train")
    return records[-1] if records else {}


def _check_export(uri: str) -> Any:
    """The export's description once `storage.check_complete` (the operator's check too) finds it complete."""
    from glmtune.export_format import EXPORT_FILE, read_export_info

    check = storage.check_complete(uri)
    if not check.complete:
        raise GlmtuneError(f"{uri}: the export is not complete: {check.problem}")
    if not storage.is_s3_uri(uri):
        return read_export_info(uri)
    return read_export_info(storage.fetch(f"{uri.rstrip('/')}/{EXPORT_FILE}").parent)


def _first_question(sources: list[str], fmt: str) -> str:
    """The first training question, to show a request whose trained answer the user knows."""
    from glmtune_trainer.data.formats import read_samples
    from glmtune_trainer.data.sources import expand_sources

    first = expand_sources(sources[:1])[0]
    sample = next(iter(read_samples(first.local_path(), first.name, fmt)), None)
    return sample.query if sample is not None else "你好"


def _glmtune_command() -> str:
    """How to call glmtune again: `glmtune` when it is on PATH, else the path this run was started with."""
    invoked = sys.argv[0] if Path(sys.argv[0]).name == "glmtune" else ""
    found = shutil.which("glmtune")
    if invoked and (found is None or Path(found).resolve() != Path(invoked).resolve()):
        return invoked
    return "glmtune"


def summary(result: PipelineResult, question: str, host: str, port: int, serving: bool) -> str:
    """The closing text: where the model is, how to chat with it, and a curl / openai request to the server."""
    from glmtune_inference.cli import API_KEY_ENV

    glmtune = _glmtune_command()
    uri = result.export_uri
    url = f"http://{'127.0.0.1' if host in _ANY_ADDRESS else host}:{port}"
    payload = {"model": result.model_name, "messages": [{"role": "user", "content": question}], "temperature": 0}
    keyed = bool(os.environ.get(API_KEY_ENV))
    auth = f' -H "Authorization: Bearer ${API_KEY_ENV}"' if keyed else ""
    api_key = f"os.environ[{API_KEY_ENV!r}]" if keyed else repr("-")
    python = [*(["import os"] if keyed else []), "from openai import OpenAI",
              f"client = OpenAI(base_url={url + '/v1'!r}, api_key={api_key})",
              f"reply = client.chat.completions.create(model={result.model_name!r}, "
              f"messages=[{{'role': 'user', 'content': {question!r}}}], temperature=0)",
              "print(reply.choices[0].message.content)"]
    loss = f", final loss {result.loss:.4f}" if result.loss is not None else ""
    lines = [
        "",
        f"Done in {_duration(result.seconds)}: {result.steps} training steps{loss}.",
        f"The fine-tuned model ({result.export_kind}) is in {uri}",
        f"Its training report (curves, data statistics, method, files): {uri.rstrip('/')}/report.html",
        "",
        "Chat with it in the terminal:",
        f"  {glmtune} chat {shlex.quote(uri)}",
        "",
        (f"Serving it as {result.model_name!r} on {url} with the OpenAI API (Ctrl-C stops). Ask a training question:"
         if serving else "Serve it with the OpenAI API:"),
    ]
    if not serving:
        lines += [f"  {glmtune} serve {shlex.quote(uri)} --model-name {result.model_name} --port {port}",
                  "then ask one of its training questions:"]
    lines += [
        f"  or open {url}/ in a browser to chat (training report: {url}/report)",
        f"  curl -s {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\",
        f"    -d {shlex.quote(json.dumps(payload, ensure_ascii=False))}",
        "or from Python (pip install openai):",
        *(f"  {line}" for line in python),
        "",
    ]
    return "\n".join(lines)


def _serve(spec: Any, result: PipelineResult, host: str, port: int) -> None:
    """Serve the export as the operator's Deployment would (`spec.serving`: name, device, dtype, batch,
    extra adapters) through `glmtune_inference.serving.serve`, which `glmtune serve` calls too; the API key comes
    from GLMTUNE_API_KEY."""
    from glmtune_inference.cli import API_KEY_ENV
    from glmtune_inference.loading import LoadOptions
    from glmtune_inference.serving import ServeOptions, serve

    serving = spec.spec.serving
    serve(result.export_uri, result.model_name, host, port, {a.name: a.uri for a in serving.adapters},
          LoadOptions(dtype=serving.dtype, device=serving.device), ServeOptions(max_batch=serving.max_batch_size),
          api_key=os.environ.get(API_KEY_ENV) or None)
