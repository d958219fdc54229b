"""`glmtune data build`: parse, tokenize (in parallel) and write records once; reuse them by content hash.

The output folder holds shards, a copy of the tokenizer files and `manifest.json`, written LAST and
atomically: a folder without a manifest is an unfinished build. Everything is built in a staging folder,
so an interrupted or failed build leaves the previous records (or nothing) and never a manifest for
partial data. Output is identical for any number of workers: samples are cut into fixed chunks, each
chunk is encoded (and packed) on its own, and results are written in chunk order.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from glmtune import storage
from glmtune.errors import InvalidInputError
from glmtune_trainer.data.cache import restore_from_cache, store_in_cache
from glmtune_trainer.data.encode import STRATEGIES
from glmtune_trainer.data.formats import DEFAULT_MAX_LINE_BYTES, Sample, SkipReport, read_samples
from glmtune_trainer.data.manifest import (
    FORMAT_VERSION,
    TOKENIZER_DIR,
    commit_build,
    complete_build,
    open_records,
    read_manifest,
)
from glmtune_trainer.data.parallel import chunks as sample_chunks
from glmtune_trainer.data.parallel import encode_chunk, init_worker, ordered_map
from glmtune_trainer.data.records import SUFFIXES, RecordSet, ShardWriter
from glmtune_trainer.data.sources import SourceFile, expand_sources
from glmtune_trainer.data.stats import record_stats

TOKENIZER_FILES = (
    "ice_text.model",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "config.json",
)
MIXED_NAME = "train"
__all__ = ["BuildConfig", "BuildResult", "build_records", "open_records", "read_manifest"]


@dataclass(frozen=True)
class BuildConfig:
    """Everything `build_records` needs; the fields that shape the records' content form the hash
    (`build_key`), the rest (workers, cache, progress, invalid-record policy) do not."""

    inputs: list[str]
    tokenizer: str
    out: str
    template: str | None = None  # None: the tokenizer family's own template
    strategy: str = "truncation"
    max_length: int = 1024
    workers: int = 1
    shuffle: bool = True
    seed: int = 42
    mixed: bool = True
    format: str = "auto"
    skip_invalid: bool = False
    max_invalid_fraction: float = 0.05
    cache: str | None = None  # a local folder or s3:// prefix holding builds by hash
    progress: bool = True
    chunk_samples: int = 1024
    shard_tokens: int = 1 << 25
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES

    @classmethod
    def from_data_spec(cls, data: Any, tokenizer: str, out: str, template: str | None = None,
                       progress: bool = False) -> BuildConfig:
        """The build a run's `spec.data` asks for; `template` is the resolved one (the spec may say "auto")."""
        return cls(inputs=list(data.sources), tokenizer=tokenizer, out=out, template=template,
                   strategy=data.strategy, max_length=data.max_length, workers=data.workers, shuffle=data.shuffle,
                   seed=data.seed, format=data.format, skip_invalid=data.skip_invalid,
                   max_invalid_fraction=data.max_invalid_fraction, cache=data.cache, progress=progress)


@dataclass
class BuildResult:
    """The manifest of the records in `out` and how they were obtained: "built", "local" or "cache"."""

    out: Path
    manifest: dict
    origin: str
    skipped: SkipReport = field(default_factory=SkipReport)


def _tokenizer_files(directory: Path) -> list[Path]:
    files = [directory / name for name in TOKENIZER_FILES if (directory / name).is_file()]
    if not any(p.name.endswith(".model") for p in files):
        raise InvalidInputError("no tokenizer here (ice_text.model or tokenizer.model)", where=str(directory))
    return files


def build_key(config: BuildConfig, sources: list[SourceFile], tokenizer_dir: Path, template: str) -> dict:
    """What determines the records' content; its sha256 is the build hash (workers do not matter)."""
    digest = hashlib.sha256()
    for path in _tokenizer_files(tokenizer_dir):
        digest.update(path.name.encode() + b"\0" + storage.file_sha256(path).encode())
    return {
        "version": FORMAT_VERSION,
        "inputs": [
            {"fingerprint": s.fingerprint, **({} if config.mixed else {"name": s.name})} for s in sources
        ],
        "tokenizer": digest.hexdigest(),
        "template": template,
        "strategy": config.strategy,
        "max_length": config.max_length,
        "shuffle": config.shuffle,
        "seed": config.seed,
        "mixed": config.mixed,
        "format": config.format,
        "chunk_samples": config.chunk_samples,
    }


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _dataset_groups(config: BuildConfig, sources: list[SourceFile]) -> list[tuple[str, list[SourceFile]]]:
    if config.mixed:
        return [(MIXED_NAME, sources)]
    names = []
    for i, source in enumerate(sources):
        stem = source.name.rstrip("/").rsplit("/", 1)[-1].split(".")[0] or "data"
        names.append((f"{i:03d}-{stem}", [source]))
    return names


class _Builder:
    """One build in a staging folder: encode every record set, shuffle, gather statistics."""

    def __init__(self, config: BuildConfig, staging: Path, tokenizer_dir: Path, template: str) -> None:
        self.config, self.staging, self.tokenizer_dir, self.template = (
            config,
            staging,
            tokenizer_dir,
            template,
        )
        self.skipped = SkipReport()
        self.totals = {"samples": 0, "truncated": 0, "windows": 0, "trained": 0}
        self.inputs: list[dict] = []

    def samples(self, sources: list[SourceFile], bar) -> Iterator[Sample]:
        skip = self.skipped if self.config.skip_invalid else None
        for source in sources:
            count = 0
            for sample in read_samples(
                source.local_path(), source.name, self.config.format, skip, self.config.max_line_bytes
            ):
                count += 1
                yield sample
            self.inputs.append({"name": source.name, "fingerprint": source.fingerprint, "samples": count})

    def write_set(self, name: str, sources: list[SourceFile], pool, bar) -> list[dict]:
        shards, writer = [], None
        chunks = sample_chunks(self.samples(sources, bar), self.config.chunk_samples)
        results = (
            ordered_map(pool, chunks, 2 * self.config.workers)
            if pool is not None
            else map(encode_chunk, chunks)
        )
        for sequences, samples, truncated in results:
            if writer is None:
                writer = ShardWriter(self.staging / "raw", f"{name}-{len(shards):05d}")
            for windows in sequences:
                writer.add(windows)
                self.totals["windows"] += len(windows)
                self.totals["trained"] += sum(len(w) - w.untrained for w in windows)
            self.totals["samples"] += samples
            self.totals["truncated"] += truncated
            bar.update(samples)
            if writer.tokens >= self.config.shard_tokens:
                shards.append(writer.close())
                writer = None
        if writer is not None:
            shards.append(writer.close())
        return shards

    def shuffle_set(self, name: str, shards: list[dict]) -> list[dict]:
        """Rewrite a record set in a seeded random order (random access over the staged shards)."""
        records = RecordSet(self.staging / "raw", shards)
        order = np.random.default_rng(self.config.seed).permutation(len(records))
        out, writer = [], None
        for i in order:
            if writer is None:
                writer = ShardWriter(self.staging / "final", f"{name}-{len(out):05d}")
            writer.add_record(records[int(i)])
            if writer.tokens >= self.config.shard_tokens:
                out.append(writer.close())
                writer = None
        if writer is not None:
            out.append(writer.close())
        return out

    def run(self) -> dict:
        from tqdm import tqdm

        config = self.config
        groups = _dataset_groups(config, expand_sources(config.inputs))
        datasets = {}
        init = (str(self.tokenizer_dir), self.template, config.strategy, config.max_length)
        with tqdm(desc="tokenizing", unit=" samples", disable=not config.progress) as bar:
            # Loaded once here (seconds, mostly imports); forked workers inherit it instead of reloading.
            init_worker(*init)
            if config.workers > 1:
                with multiprocessing.get_context("fork").Pool(config.workers) as pool:
                    staged = {name: self.write_set(name, srcs, pool, bar) for name, srcs in groups}
            else:
                staged = {name: self.write_set(name, srcs, None, bar) for name, srcs in groups}
        if config.skip_invalid:
            self.skipped.check(config.max_invalid_fraction)
        if self.totals["samples"] == 0:
            raise InvalidInputError("the inputs hold no valid samples", where=", ".join(config.inputs))
        for name, shards in staged.items():
            if config.shuffle:
                shards = self.shuffle_set(name, shards)
            else:
                (self.staging / "final").mkdir(exist_ok=True)
                for entry in shards:
                    for suffix in SUFFIXES:
                        os.replace(
                            self.staging / "raw" / f"{entry['name']}{suffix}",
                            self.staging / "final" / f"{entry['name']}{suffix}",
                        )
            datasets[name] = {
                "sequences": sum(s["sequences"] for s in shards),
                "tokens": sum(s["tokens"] for s in shards),
                "shards": shards,
            }
        shutil.rmtree(self.staging / "raw", ignore_errors=True)
        lengths = np.concatenate(
            [RecordSet(self.staging / "final", d["shards"]).lengths() for d in datasets.values()]
        )
        stats = record_stats(
            lengths,
            self.totals["trained"],
            self.totals["samples"],
            self.totals["truncated"],
            self.totals["windows"],
            config.max_length,
        )
        return {"datasets": datasets, "stats": stats, "inputs": self.inputs}


def _apply_invalid_policy(manifest: dict, config: BuildConfig) -> dict:
    """A reused build skipped bad records under some earlier policy: hold them to this run's policy."""
    invalid = manifest["invalid"]
    if not invalid["records"]:
        return manifest
    report = SkipReport(valid=invalid["valid_records"])
    for reason, count in invalid["by_reason"].items():
        report.counts[reason] = count
        report.examples[reason] = invalid["examples"].get(reason, [])
    if not config.skip_invalid:
        first = next(iter(report.examples.values()))[0]
        raise InvalidInputError(
            f"{first} (the matching earlier build skipped {report.invalid} invalid records; "
            "pass --skip-invalid to accept that)"
        )
    report.check(config.max_invalid_fraction)
    return manifest


def _remove_dead_staging(out: Path) -> None:
    """Staging folders of builds whose process is gone (killed) are garbage."""
    for staging in out.glob(".staging-*"):
        pid = staging.name.rsplit("-", 1)[-1]
        try:
            os.kill(int(pid), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(staging, ignore_errors=True)
        except PermissionError:
            continue


def _check(config: BuildConfig) -> None:
    if config.strategy not in STRATEGIES:
        raise InvalidInputError(f"unknown strategy {config.strategy!r}; use one of {', '.join(STRATEGIES)}")
    if config.max_length < 16:
        raise InvalidInputError(f"max_length must be at least 16, got {config.max_length}")
    if config.workers < 1 or config.chunk_samples < 1:
        raise InvalidInputError("workers and chunk_samples must be at least 1")
    if not 0.0 <= config.max_invalid_fraction <= 1.0:
        raise InvalidInputError("max_invalid_fraction must be between 0 and 1")


def build_records(config: BuildConfig) -> BuildResult:
    """Build records for `config` into `config.out`, or reuse a finished build with the same hash
    (already in `out`, or in the cache)."""
    from glmtune.modeling.families import family as detect_family
    from glmtune.templates import TEMPLATES, template_for_family

    _check(config)
    out = Path(config.out)
    sources = expand_sources(config.inputs)
    tokenizer_dir = storage.fetch(config.tokenizer)
    if not tokenizer_dir.is_dir():
        raise InvalidInputError("the tokenizer must be a directory (as published)", where=config.tokenizer)
    template = config.template or template_for_family(detect_family(tokenizer_dir))
    if template not in TEMPLATES:
        raise InvalidInputError(f"unknown template {template!r}; use one of {', '.join(TEMPLATES)}")
    key = build_key(config, sources, tokenizer_dir, template)
    digest = key_hash(key)
    existing = complete_build(out, digest) if out.is_dir() else None
    if existing is not None:
        return BuildResult(out, _apply_invalid_policy(existing, config), "local")
    out.mkdir(parents=True, exist_ok=True)
    _remove_dead_staging(out)
    staging = out / f".staging-{digest[:12]}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        if config.cache:
            restored = restore_from_cache(config.cache, digest, out, staging)
            if restored is not None:
                return BuildResult(out, _apply_invalid_policy(restored, config), "cache")
        started = time.monotonic()
        builder = _Builder(config, staging, tokenizer_dir, template)
        built = builder.run()
        (staging / "final" / TOKENIZER_DIR).mkdir(parents=True)
        for path in _tokenizer_files(tokenizer_dir):
            shutil.copy2(path, staging / "final" / TOKENIZER_DIR / path.name)
        seconds = time.monotonic() - started
        manifest = {
            "format": FORMAT_VERSION,
            "hash": digest,
            "key": key,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "template": template,
            "strategy": config.strategy,
            "max_length": config.max_length,
            "tokenizer": {
                "source": str(config.tokenizer),
                "dir": TOKENIZER_DIR,
                "family": detect_family(tokenizer_dir),
            },
            "inputs": built["inputs"],
            "datasets": built["datasets"],
            "stats": built["stats"],
            "invalid": {
                "records": builder.skipped.invalid,
                "valid_records": builder.skipped.valid,
                "by_reason": dict(builder.skipped.counts),
                "examples": builder.skipped.examples,
            },
            "build": {
                "workers": config.workers,
                "seconds": round(seconds, 3),
                "samples_per_second": round(built["stats"]["samples"] / max(seconds, 1e-9), 1),
                "config": {k: v for k, v in asdict(config).items() if k not in ("progress",)},
            },
        }
        commit_build(staging / "final", out, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if config.cache:
        store_in_cache(out, config.cache, digest)
    return BuildResult(out, manifest, "built", builder.skipped)
