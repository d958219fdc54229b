"""Random-weight ChatGLM checkpoints at full size in THUDM's published layouts, for benchmarks (no download).

Layouts: `chatglm-6b` (8 fp16 `pytorch_model-0000N-of-00008.bin` shards + `pytorch_model.bin.index.json`, the
output layer stored as a copy of the tied embedding), `chatglm2-6b` (7 fp16 shards + index) and
`chatglm-6b-int4` (one `pytorch_model.bin` with packed int4 block weights, fp16 scales, no separate lm_head),
each with config.json in the published keys and the real tokenizer files. Files are written one at a time
(a shard's tensors in memory, the single int4 file from file-backed scratch tensors), never the whole
model in RAM. A finished checkpoint is cached (default ~/.cache/glmtune-bench/) and reused by later runs.

    python bench/fullsize.py chatglm2-6b                     # write (or find) it, print its folder
    python bench/fullsize.py chatglm2-6b --measure-load      # + load time, peak RSS (bench_fullsize_load.py)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
MARKER = ".glmtune-bench.json"
DEFAULT_CACHE = Path("~/.cache/glmtune-bench")
REPO_ROOT = Path(__file__).resolve().parent.parent
_AUTO_MAP = {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
             "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
             "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration"}
_V1_CONFIG = {"architectures": ["ChatGLMModel"], "auto_map": _AUTO_MAP, "model_type": "chatglm",
              "vocab_size": 130528, "hidden_size": 4096, "num_layers": 28, "num_attention_heads": 32,
              "inner_hidden_size": 16384, "layernorm_epsilon": 1e-05, "max_sequence_length": 2048,
              "position_encoding_2d": True, "bos_token_id": 130004, "eos_token_id": 130005,
              "mask_token_id": 130000, "gmask_token_id": 130001, "pad_token_id": 3, "use_cache": True,
              "torch_dtype": "float16", "transformers_version": "4.27.1"}
_V2_CONFIG = {"architectures": ["ChatGLMModel"], "model_type": "chatglm",
              "auto_map": {**_AUTO_MAP, "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
              "add_bias_linear": False, "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
              "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0,
              "attention_softmax_in_fp32": True, "bias_dropout_fusion": True, "ffn_hidden_size": 13696,
              "fp32_residual_connection": False, "hidden_dropout": 0.0, "hidden_size": 4096, "kv_channels": 128,
              "layernorm_epsilon": 1e-05, "multi_query_attention": True, "multi_query_group_num": 2,
              "num_attention_heads": 32, "num_layers": 28, "original_rope": True, "padded_vocab_size": 65024,
              "post_layer_norm": True, "rmsnorm": True, "seq_length": 32768, "use_cache": True,
              "torch_dtype": "float16", "transformers_version": "4.27.1", "tie_word_embeddings": False,
              "eos_token_id": 2, "pad_token_id": 0}


@dataclass(frozen=True)
class Layout:
    """One published checkpoint layout: family, base config, shard count (1: a single pytorch_model.bin)."""

    family: str
    config: dict[str, Any]
    shards: int
    bits: int
    tokenizer: str
    tokenizer_files: tuple[str, ...]


LAYOUTS = {
    "chatglm-6b": Layout("v1", _V1_CONFIG, 8, 0, "chatglm6b", ("ice_text.model", "tokenizer_config.json")),
    "chatglm2-6b": Layout("v2", _V2_CONFIG, 7, 0, "chatglm2", ("tokenizer.model", "tokenizer_config.json")),
    "chatglm-6b-int4": Layout("v1", {**_V1_CONFIG, "quantization_bit": 4, "quantization_embeddings": False}, 1, 4,
                              "chatglm6b", ("ice_text.model", "tokenizer_config.json")),
}


@dataclass(frozen=True)
class TensorSpec:
    """A stored tensor: key, shape, dtype and how to fill it (normal, ones, zeros, int4, scale, inv_freq)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    fill: str

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


def _linear(prefix: str, out: int, inp: int, bias: bool, bits: int) -> list[TensorSpec]:
    fp16 = torch.float16
    if bits:
        specs = [TensorSpec(f"{prefix}.weight", (out, inp * bits // 8), torch.int8, f"int{bits}"),
                 TensorSpec(f"{prefix}.weight_scale", (out,), fp16, "scale")]
    else:
        specs = [TensorSpec(f"{prefix}.weight", (out, inp), fp16, "normal")]
    return specs + ([TensorSpec(f"{prefix}.bias", (out,), fp16, "zeros")] if bias else [])


def _norm(prefix: str, hidden: int, bias: bool) -> list[TensorSpec]:
    return [TensorSpec(f"{prefix}.weight", (hidden,), torch.float16, "ones")] + (
        [TensorSpec(f"{prefix}.bias", (hidden,), torch.float16, "zeros")] if bias else [])


def tensor_specs(layout: Layout, config: dict[str, Any]) -> list[TensorSpec]:
    """Every stored tensor of `layout` with `config`'s sizes, in the published key names and order."""
    hidden, layers, bits = config["hidden_size"], config["num_layers"], layout.bits
    fp16 = torch.float16
    if layout.family == "v1":
        inner, vocab = config["inner_hidden_size"], config["vocab_size"]
        rotary = hidden // (config["num_attention_heads"] * 2) // 2
        specs = [TensorSpec("transformer.word_embeddings.weight", (vocab, hidden), fp16, "normal")]
        for i in range(layers):
            p = f"transformer.layers.{i}"
            specs += [*_norm(f"{p}.input_layernorm", hidden, True),
                      *_linear(f"{p}.attention.query_key_value", 3 * hidden, hidden, True, bits),
                      TensorSpec(f"{p}.attention.rotary_emb.inv_freq", (rotary,), fp16, "inv_freq"),
                      *_linear(f"{p}.attention.dense", hidden, hidden, True, bits),
                      *_norm(f"{p}.post_attention_layernorm", hidden, True),
                      *_linear(f"{p}.mlp.dense_h_to_4h", inner, hidden, True, bits),
                      *_linear(f"{p}.mlp.dense_4h_to_h", hidden, inner, True, bits)]
        specs += _norm("transformer.final_layernorm", hidden, True)
        if not bits:  # the fp16 release stores the tied output layer again; the int4 one does not
            specs.append(TensorSpec("lm_head.weight", (vocab, hidden), fp16, "tied"))
        return specs
    ffn, kv, vocab = config["ffn_hidden_size"], config["kv_channels"], config["padded_vocab_size"]
    qkv = hidden + 2 * config["multi_query_group_num"] * kv
    specs = [TensorSpec("transformer.embedding.word_embeddings.weight", (vocab, hidden), fp16, "normal"),
             TensorSpec("transformer.rotary_pos_emb.inv_freq", (kv // 4,), fp16, "inv_freq")]
    for i in range(layers):
        p = f"transformer.encoder.layers.{i}"
        specs += [*_norm(f"{p}.input_layernorm", hidden, False),
                  *_linear(f"{p}.self_attention.query_key_value", qkv, hidden, True, bits),
                  *_linear(f"{p}.self_attention.dense", hidden, hidden, False, bits),
                  *_norm(f"{p}.post_attention_layernorm", hidden, False),
                  *_linear(f"{p}.mlp.dense_h_to_4h", 2 * ffn, hidden, False, bits),
                  *_linear(f"{p}.mlp.dense_4h_to_h", hidden, ffn, False, bits)]
    return specs + [*_norm("transformer.encoder.final_layernorm", hidden, False),
                    TensorSpec("transformer.output_layer.weight", (vocab, hidden), fp16, "normal")]


def split_shards(sizes: list[int], count: int) -> list[range]:
    """`count` consecutive, non-empty index ranges of about equal byte size (THUDM's shards keep key order)."""
    if count > len(sizes):
        raise ValueError(f"{count} shards for {len(sizes)} tensors")
    total, ranges, start, done = sum(sizes), [], 0, 0
    for k in range(count - 1):
        end = start + 1
        done += sizes[start]
        while end < len(sizes) - (count - 1 - k) and done + sizes[end] / 2 <= total * (k + 1) / count:
            done += sizes[end]
            end += 1
        ranges.append(range(start, end))
        start = end
    return ranges + [range(start, len(sizes))]


def fill(spec: TensorSpec, out: torch.Tensor, seed: int) -> None:
    """Random (or fixed) values for `spec` written into `out`; seeded by key so reruns give the same bytes
    (and the v1 output layer, seeded by the embedding's key, the embedding's values)."""
    key = "transformer.word_embeddings.weight" if spec.fill == "tied" else spec.name
    generator = torch.Generator().manual_seed(zlib.crc32(key.encode()) ^ seed)
    if spec.fill in ("normal", "tied"):
        out.normal_(0.0, 0.02, generator=generator)
    elif spec.fill == "ones":
        out.fill_(1.0)
    elif spec.fill == "zeros":
        out.zero_()
    elif spec.fill.startswith("int"):
        out.random_(-128, 128, generator=generator)
    elif spec.fill == "scale":  # per-row absmax / 7 of weights drawn like the "normal" ones
        out.uniform_(0.008, 0.012, generator=generator)
    else:
        dim = spec.shape[0] * 2
        out.copy_(1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim))


def _write_file(path: Path, specs: list[TensorSpec], seed: int, scratch: Path | None) -> None:
    """One torch.save'd file; with `scratch`, tensors live in files there (page cache, not anonymous memory)."""
    tensors: dict[str, torch.Tensor] = {}
    for i, spec in enumerate(specs):
        if scratch is None:
            tensor = torch.empty(spec.shape, dtype=spec.dtype)
        else:
            count = spec.nbytes // torch.empty((), dtype=spec.dtype).element_size()
            tensor = torch.from_file(str(scratch / f"{i}.bin"), shared=True, size=count, dtype=spec.dtype)
            tensor = tensor.view(spec.shape)
        fill(spec, tensor, seed)
        tensors[spec.name] = tensor
    torch.save(tensors, path)


def _cache_folder(cache_dir: Path, name: str, overrides: dict[str, Any]) -> Path:
    if not overrides:
        return cache_dir / name
    digest = hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:10]
    return cache_dir / f"{name}-{digest}"


def _remove_abandoned(target: Path) -> None:
    """Delete half-written copies of `target` left by killed runs (their pid is gone): gigabytes each."""
    for leftover in target.parent.glob(f".{target.name}.writing-*"):
        pid = leftover.name.rsplit(".writing-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(leftover, ignore_errors=True)


def default_tokenizers() -> Path:
    """The real tokenizer files: $GLMTUNE_SHARED (default ../shared next to the repo)/reference/vectors/tokenizers."""
    shared = Path(os.environ.get("GLMTUNE_SHARED", REPO_ROOT.parent / "shared"))
    return shared / "reference" / "vectors" / "tokenizers"


def write_layout(name: str, cache_dir: Path = DEFAULT_CACHE, overrides: dict[str, Any] | None = None,
                 seed: int = 0, tokenizers: Path | None = None) -> Path:
    """The folder of checkpoint `name` (a LAYOUTS key) with `overrides` on its config, written unless cached."""
    layout = LAYOUTS[name]
    overrides = dict(overrides or {})
    config = {**layout.config, **overrides}
    target = _cache_folder(Path(cache_dir).expanduser(), name, overrides)
    identity = {"layout": name, "overrides": overrides, "seed": seed, "format": FORMAT_VERSION}
    marker = target / MARKER
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == identity:
        return target
    source = (tokenizers or default_tokenizers()) / layout.tokenizer
    missing = [f for f in layout.tokenizer_files if not (source / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{source}: tokenizer files {', '.join(missing)} missing (set GLMTUNE_SHARED)")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.writing-{os.getpid()}-", dir=target.parent))
    try:
        specs = tensor_specs(layout, config)
        if layout.shards == 1:
            with tempfile.TemporaryDirectory(prefix="scratch-", dir=staging) as scratch:
                _write_file(staging / "pytorch_model.bin", specs, seed, Path(scratch))
        else:
            names = [f"pytorch_model-{i + 1:05d}-of-{layout.shards:05d}.bin" for i in range(layout.shards)]
            ranges = split_shards([s.nbytes for s in specs], layout.shards)
            for file_name, part in zip(names, ranges, strict=True):
                _write_file(staging / file_name, [specs[i] for i in part], seed, None)
            index = {"metadata": {"total_size": sum(s.nbytes for s in specs)},
                     "weight_map": {specs[i].name: file_name for file_name, part in zip(names, ranges, strict=True)
                                    for i in part}}
            (staging / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        for file_name in layout.tokenizer_files:
            shutil.copyfile(source / file_name, staging / file_name)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (staging / MARKER).write_text(json.dumps(identity) + "\n", encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)  # an unfinished or differently made copy of ours
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("layout", choices=sorted(LAYOUTS))
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where checkpoints are kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizers", type=Path, default=None,
                        help="folder with chatglm6b/ and chatglm2/ tokenizer files (default: from GLMTUNE_SHARED)")
    parser.add_argument("--measure-load", action="store_true", help="time glmtune.load_model against a file read")
    parser.add_argument("--dtype", default="float16", help="dtype for --measure-load")
    parser.add_argument("--quantize", type=int, choices=(4, 8), default=None, help="quantize at load (--measure-load)")
    parser.add_argument("--decode", type=int, default=0, metavar="TOKENS",
                        help="after --measure-load, time batch-1 greedy decoding of this many tokens")
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args(argv)
    import time

    start = time.perf_counter()
    folder = write_layout(args.layout, args.cache_dir, seed=args.seed, tokenizers=args.tokenizers)
    print(f"{folder} ready after {time.perf_counter() - start:.0f} s", flush=True)
    if args.measure_load:
        from bench_fullsize_load import load_report, measure_load

        result = measure_load(folder, args.dtype, args.quantize, args.decode)
        text = load_report(args.layout, folder, args.dtype, args.quantize, result)
        print(text)
        if not args.no_record:
            from results import record

            record("fullsize.py", text, argv if argv is not None else sys.argv[1:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
