"""Fixtures for the inference tests: tiny GLM models (v1, v2) overfit by a plain torch loop on a few Q/A
pairs, every export kind written from them, and a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# What the fully fine-tuned / merged models learn.
QA = (("你好", "你好！我是人工智能助手。"), ("从南京到上海的路线", "建议乘坐高铁，大约一个半小时。"))
# What the LoRA adapter and the prefix learn over the untrained base, so a request shows which one answered.
QA_LORA = (("你好", "Hello, world!"),)
QA_PREFIX = (("你好", "谢谢你的帮助，再见！"),)
PRE_SEQ_LEN = 4


def overfit(model: Any, tokenizer: Any, template: str, pairs: tuple, steps: int, lr: float,
            before_step: Callable[[int], None] | None = None) -> None:
    """Plain AdamW on the answer tokens of `pairs` (prompt positions masked) until the loss is tiny."""
    from glmtune.templates import encode_answer, encode_prompt

    samples = [(encode_prompt(tokenizer, template, query).ids, encode_answer(tokenizer, template, answer))
               for query, answer in pairs]
    overfit_ids(model, samples, steps, lr, before_step)


def overfit_ids(model: Any, samples: list[tuple[list[int], list[int]]], steps: int, lr: float,
                before_step: Callable[[int], None] | None = None) -> None:
    """Plain AdamW on (prompt ids, answer ids) samples, the loss on the answer ids only."""
    import torch

    samples = [(torch.tensor([prompt + target]), torch.tensor([[-100] * len(prompt) + target]))
               for prompt, target in samples]
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        optimizer.zero_grad()
        for ids, labels in samples:
            model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss.backward()
        optimizer.step()
        if before_step is not None:
            before_step(step)
    model.eval()


def reference_answers(model: Any, tokenizer: Any, template: str, pairs: tuple,
                      max_new_tokens: int = 24) -> dict[str, str]:
    """Greedy answers of an in-memory model through transformers' own generate(), the loaders' yardstick."""
    import torch

    from glmtune.templates import encode_prompt, stop_token_ids

    answers = {}
    for query, _ in pairs:
        ids = torch.tensor([encode_prompt(tokenizer, template, query).ids])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=stop_token_ids(tokenizer, template),
                             pad_token_id=tokenizer.pad_token_id)
        answers[query] = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return answers


def write_export(directory: Path, kind: str, family: str, method: str, base: Path | str | None = None,
                 **extra: Any) -> Path:
    """glmtune-export.json, then the manifest last (what `glmtune export` writes)."""
    from glmtune import storage
    from glmtune.export_format import ExportInfo, write_export_info

    info = ExportInfo(kind=kind, family=family, template=family, method=method,
                      base_model=None if base is None else str(base), run={"spec_name": f"{kind}-{family}",
                                                                           "steps": 1}, **extra)
    write_export_info(directory, info)
    storage.write_manifest(directory)
    return directory


class ExportFactory:
    """Builds each export kind once per session; `get(kind, family)` returns its folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.made: dict[tuple[str, str], Path] = {}
        # (kind, family) -> {query: greedy answer of the in-memory trained model via transformers generate()}
        self.reference: dict[tuple[str, str], dict[str, str]] = {}

    def get(self, kind: str, family: str = "v2") -> Path:
        import torch

        key = (kind, family)
        if key not in self.made:
            torch.manual_seed(0)  # each export is the same whatever was built before it
            self.made[key] = getattr(self, f"_make_{kind}")(family, self.root / f"{kind}-{family}")
        return self.made[key]

    def _make_base(self, family: str, out: Path) -> Path:
        from glmtune.modeling import create_model_dir

        return create_model_dir(family, "tiny", out, seed=0)

    def _make_full(self, family: str, out: Path) -> Path:
        from glmtune.modeling import load_model, save_pretrained
        from glmtune.tokenization import load_tokenizer

        base = self.get("base", family)
        model, tokenizer = load_model(base), load_tokenizer(base)
        overfit(model, tokenizer, family, QA, steps=60, lr=1e-2)
        self.reference[("full", family)] = reference_answers(model, tokenizer, family, QA)
        save_pretrained(model, out, tokenizer=tokenizer)
        return write_export(out, "full", family, "full")

    def _make_int8(self, family: str, out: Path) -> Path:
        """The fine-tuned model stored pre-quantized (int8 weights and scales in the checkpoint)."""
        from glmtune.modeling import load_model, save_pretrained
        from glmtune.tokenization import load_tokenizer

        full = self.get("full", family)
        model = load_model(full, quantization_bit=8)
        save_pretrained(model, out, tokenizer=load_tokenizer(full))
        return write_export(out, "merged", family, "full", quantization_bit=8)

    def _make_adapter(self, family: str, out: Path, bits: int = 0) -> Path:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(task_type="CAUSAL_LM", target_modules=["query_key_value"], r=8, lora_alpha=16,
                            lora_dropout=0.0)
        if bits:
            from glmtune.export_loading import register_quantized_linear

            register_quantized_linear(config)
        return self._peft(family, out, get_peft_model, config, "lora", bits)

    def _make_adapter_int8(self, family: str, out: Path) -> Path:
        """LoRA trained over the int8-quantized base (QuantizedLinear), as a glmtune int8 LoRA run does."""
        return self._make_adapter(family, out, bits=8)

    def _make_adalora(self, family: str, out: Path) -> Path:
        from peft import AdaLoraConfig, get_peft_model

        config = AdaLoraConfig(task_type="CAUSAL_LM", target_modules=["query_key_value"], init_r=8, target_r=4,
                               tinit=5, tfinal=10, deltaT=2, total_step=100, lora_alpha=16, lora_dropout=0.0)
        return self._peft(family, out, get_peft_model, config, "adalora")

    def _peft(self, family: str, out: Path, wrap: Callable, config: Any, method: str, bits: int = 0) -> Path:
        from glmtune.modeling import load_model
        from glmtune.tokenization import load_tokenizer

        base = self.get("base", family)
        tokenizer = load_tokenizer(base)
        model = wrap(load_model(base, quantization_bit=bits or None), config)
        allocate = getattr(model.base_model, "update_and_allocate", None) if method == "adalora" else None
        overfit(model, tokenizer, family, QA_LORA, steps=100 if method == "adalora" else 60, lr=2e-2,
                before_step=(lambda step: allocate(step)) if allocate else None)
        kind = "adalora" if method == "adalora" else "adapter" + (f"_int{bits}" if bits else "")
        self.reference[(kind, family)] = reference_answers(model, tokenizer, family, QA_LORA)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        return write_export(out, "adapter", family, method, base=base, quantization_bit=bits)

    def _make_prefix(self, family: str, out: Path, bits: int = 0) -> Path:
        from safetensors.torch import save_file

        from glmtune.modeling import load_model
        from glmtune.tokenization import load_tokenizer

        base = self.get("base", family)
        tokenizer = load_tokenizer(base)
        model = load_model(base, quantization_bit=bits or None, config_overrides={"pre_seq_len": PRE_SEQ_LEN})
        model.transformer.prefix_dropout.p = 0.0
        for name, param in model.named_parameters():
            param.requires_grad = name.startswith("transformer.prefix_encoder.")
        overfit(model, tokenizer, family, QA_PREFIX, steps=150, lr=5e-2)
        self.reference[("prefix" + (f"_int{bits}" if bits else ""), family)] = reference_answers(
            model, tokenizer, family, QA_PREFIX)
        out.mkdir(parents=True)
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k.startswith("transformer.prefix_encoder.")}
        save_file(state, str(out / "prefix_encoder.safetensors"))
        shutil.copy(base / "config.json", out / "config.json")
        _set_json(out / "config.json", pre_seq_len=PRE_SEQ_LEN, prefix_projection=False)
        tokenizer.save_pretrained(out)
        return write_export(out, "prefix", family, "ptv2", base=base, pre_seq_len=PRE_SEQ_LEN, quantization_bit=bits)

    def _make_prefix_int4(self, family: str, out: Path) -> Path:
        """p-tuning v2 trained over the int4-quantized base (the ptv2-int4 example's setup)."""
        return self._make_prefix(family, out, bits=4)


def _set_json(path: Path, **values: Any) -> None:
    import json

    data = json.loads(path.read_text())
    data.update(values)
    path.write_text(json.dumps(data, indent=2))


@pytest.fixture(scope="session")
def exports(tmp_path_factory: pytest.TempPathFactory) -> ExportFactory:
    """Every export kind of tiny v1/v2 models, made on first use and kept for the session."""
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    return ExportFactory(tmp_path_factory.mktemp("exports"))


@pytest.fixture(scope="session")
def bundle_base() -> Callable[[Path, Path, Path], Path]:
    """`bundle_base(export, base, target)`: a copy of `export` carrying its base inside, recorded relative as
    `base` (what export writes for a created base model), manifest rewritten."""

    def bundle(export: Path, base: Path, target: Path) -> Path:
        import json

        from glmtune import storage

        copy = shutil.copytree(export, target)
        shutil.copytree(base, copy / "base")
        info = json.loads((copy / "glmtune-export.json").read_text())
        (copy / "glmtune-export.json").write_text(json.dumps({**info, "base_model": "base"}))
        storage.write_manifest(copy)
        return copy

    return bundle


@dataclass
class RunningServer:
    url: str
    server: Any  # the uvicorn.Server (set `should_exit` to shut it down gracefully)
    engine: Any


@contextlib.contextmanager
def running_server(app: Any, engine: Any, drain_notice_s: float = 0.0) -> Iterator[RunningServer]:
    """Run `app` under uvicorn (as `glmtune serve` does, with its drain notice) on a free port of 127.0.0.1 in a
    thread."""
    import uvicorn
    from glmtune_inference.server import DrainingServer

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=10)
    server = DrainingServer(config, engine, drain_notice_s)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield RunningServer(f"http://127.0.0.1:{port}", server, engine)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="session")
def server_factory() -> Callable[..., contextlib.AbstractContextManager[RunningServer]]:
    """`with server_factory(served_models, **settings) as running:` a real server over a fresh engine."""

    @contextlib.contextmanager
    def serve(models: dict, max_batch: int = 8, queue_size: int = 16, drain_notice_s: float = 0.0,
              kv_budget: int | None = None, **settings: Any) -> Iterator[RunningServer]:
        from glmtune_inference.scheduler import ServingEngine
        from glmtune_inference.server import ServerSettings, create_app

        engine = ServingEngine(models, max_batch=max_batch, queue_size=queue_size, kv_budget=kv_budget)
        with running_server(create_app(engine, ServerSettings(**settings)), engine, drain_notice_s) as running:
            yield running

    return serve


@pytest.fixture(scope="session")
def served(exports: ExportFactory) -> Callable[..., dict]:
    """`served(uri, adapters=None, name=None, **load options)` → served models, loaded once per arguments."""
    from glmtune_inference.loading import LoadOptions, load_served_models

    cache: dict[tuple, dict] = {}

    def load(uri: Path | str, adapters: dict | None = None, name: str | None = None, **options: Any) -> dict:
        key = (str(uri), tuple(sorted((adapters or {}).items())), name, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = load_served_models(str(uri), {k: str(v) for k, v in (adapters or {}).items()}, name,
                                            LoadOptions(**options))
        return cache[key]

    return load


@pytest.fixture(scope="session")
def fine_tune() -> Callable[..., Path]:
    """`fine_tune(family, samples, out, steps, lr)`: a tiny base of `family` overfit on (prompt ids, answer ids)
    samples, saved as a full export at `out` (for behaviours the shared exports do not show, e.g. tool calls)."""

    def make(family: str, samples: Callable[[Any], list[tuple[list[int], list[int]]]], out: Path, steps: int = 80,
             lr: float = 1e-2) -> Path:
        import torch

        from glmtune.modeling import create_model_dir, load_model, save_pretrained
        from glmtune.tokenization import load_tokenizer

        base = create_model_dir(family, "tiny", out.with_name(out.name + "-base"), seed=0)
        model, tokenizer = load_model(base), load_tokenizer(base)
        torch.manual_seed(0)
        overfit_ids(model, samples(tokenizer), steps, lr)
        save_pretrained(model, out, tokenizer=tokenizer)
        return write_export(out, "full", family, "full")

    return make


@pytest.fixture(scope="session")
def trained_qa() -> dict[str, tuple]:
    """The (question, answer) pairs each export kind was trained on."""
    return {"full": QA, "int8": QA, "adapter": QA_LORA, "adapter_int8": QA_LORA, "adalora": QA_LORA,
            "prefix": QA_PREFIX, "prefix_int4": QA_PREFIX}
