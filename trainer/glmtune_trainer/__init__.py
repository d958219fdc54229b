"""glmtune_trainer: everything that turns a user's data and a base model into a fine-tuned one.

`glmtune_trainer.data` turns question/answer files into tokenized, streamable records (`glmtune data ...`).
Training (`glmtune train`, `python -m glmtune_trainer` under torchrun, `glmtune run`) goes through the seam:
`seam.prepare(spec, workdir)` (base model, records, step plan) then `run.train(prepared)`, which drives
`model_setup` (base model), `batches` (records → per-rank batches), `methods` (lora / adalora / ptv2 /
freeze / full), `optim`, `engine` (single process / DDP / DeepSpeed ZeRO, configs in `deepspeed/`),
`loop` (fit / validate), `loss` (chunked label-only cross-entropy), `guard` (NaN/Inf), `checkpoint`
(atomic, keep-last-K, S3 mirror, resume), `metrics` and `genmetrics`; `export.export(...)` writes the result.
"""
