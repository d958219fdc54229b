"""Invalid spec files, each with the one line (marked `#!`) its error must point at, and the field path."""

from __future__ import annotations

BASE_MODEL = "model: {uri: /models/glm, family: v2}"
BASE_DATA = "data: {sources: [data/a.json]}"
BASE_OUTPUT = "output: {uri: out}"


def bare(*sections: str) -> str:
    """A bare spec with the base sections, replaced by any given section of the same top-level name."""
    given = {section.split(":", 1)[0].strip(): section for section in sections}
    base = {"model": BASE_MODEL, "data": BASE_DATA, "output": BASE_OUTPUT}
    return "\n".join([given.pop(key, value) for key, value in base.items()] + list(given.values())) + "\n"


CASES = {
    "lora_and_ptv2_together": (
        bare("method:\n  name: ptv2\n  ptv2: {preSeqLen: 16}\n  lora: {r: 4}  #!"),
        "spec.method.lora",
    ),
    "adalora_without_total_steps": (
        bare("method:\n  name: adalora\n  adalora: {targetR: 4}  #!"),
        "spec.method.adalora.totalStep",
    ),
    "adalora_init_rank_below_target": (
        bare("method:\n  name: adalora\n  adalora: {targetR: 8, initR: 4, totalStep: 100}  #!"),
        "spec.method.adalora.initR",
    ),
    "adalora_schedule_longer_than_training": (
        bare("method:\n  name: adalora\n  adalora: {tinit: 60, tfinal: 50}  #!", "training: {maxSteps: 100}"),
        "spec.method.adalora.tinit",
    ),
    "zero3_with_int4": (
        bare(
            "model:\n  uri: /models/glm\n  quantization: {bits: 4}",
            "method: {name: ptv2}",
            "training:\n  deepspeed:\n    stage: 3  #!",
        ),
        "spec.training.deepspeed.stage",
    ),
    "zero3_with_bitsandbytes_4bit": (
        bare(
            "model:\n  uri: /models/glm\n  quantization: {bits: 4, backend: bitsandbytes}",
            "training:\n  deepspeed: {stage: 3}  #!",
        ),
        "spec.training.deepspeed.stage",
    ),
    "ptv2_with_zero3": (
        bare("method: {name: ptv2}", "training:\n  deepspeed: {stage: 3}  #!"),
        "spec.training.deepspeed.stage",
    ),
    "uri_and_create_together": (
        "model:\n  uri: /models/glm\n  family: v1\n  create: {size: tiny}  #!\n"
        + BASE_DATA
        + "\n"
        + BASE_OUTPUT,
        "spec.model.create",
    ),
    "neither_uri_nor_create": (
        "model:  #!\n  family: v1\n" + BASE_DATA + "\n" + BASE_OUTPUT,
        "spec.model.uri",
    ),
    "create_without_family": (
        "model:  #!\n  create: {size: tiny}\n" + BASE_DATA + "\n" + BASE_OUTPUT,
        "spec.model.family",
    ),
    "hf_layout_outside_glm4": (
        "model:\n  family: v2\n  create: {size: tiny, layout: hf}  #!\n" + BASE_DATA + "\n" + BASE_OUTPUT,
        "spec.model.create.layout",
    ),
    "bitsandbytes_with_ptv2": (
        bare(
            "model:\n  uri: /models/glm\n  quantization:\n    bits: 8\n    backend: bitsandbytes  #!",
            "method: {name: ptv2}",
        ),
        "spec.model.quantization.backend",
    ),
    "quantized_full_training": (
        bare("model:\n  uri: /models/glm\n  quantization: {bits: 8}  #!", "method: {name: full}"),
        "spec.model.quantization",
    ),
    "warmup_steps_and_ratio": (
        bare("training:\n  warmupSteps: 10\n  warmupRatio: 0.1  #!"),
        "spec.training.warmupRatio",
    ),
    "lora_rank_zero": (
        bare("method:\n  lora:\n    r: 0  #!"),
        "spec.method.lora.r",
    ),
    "lora_dropout_one": (
        bare("method:\n  lora: {dropout: 1.0}  #!"),
        "spec.method.lora.dropout",
    ),
    "eval_split_half": (
        "model: {uri: m}\ndata:\n  sources: [a.json]\n  evalSplit: 0.5  #!\n" + BASE_OUTPUT,
        "spec.data.evalSplit",
    ),
    "max_length_too_short": (
        "model: {uri: m}\ndata:\n  sources: [a.json]\n  maxLength: 8  #!\n" + BASE_OUTPUT,
        "spec.data.maxLength",
    ),
    "malformed_s3_output": (
        bare("output:\n  uri: s3://Not_A_Bucket/x  #!"),
        "spec.output.uri",
    ),
    "unsupported_scheme_in_sources": (
        bare("data:\n  sources:\n    - data/a.json\n    - gs://bucket/b.json  #!"),
        "spec.data.sources[1]",
    ),
    "checkpoint_mirror_not_s3": (
        bare("training:\n  checkpoint:\n    mirrorUri: /tmp/mirror  #!"),
        "spec.training.checkpoint.mirrorUri",
    ),
    "resume_from_unsupported_scheme": (
        bare("training:\n  checkpoint:\n    resume: gs://b/ckpt  #!"),
        "spec.training.checkpoint.resume",
    ),
    "inline_s3_credentials": (
        bare("s3:\n  endpoint: http://minio:9000\n  secretAccessKey: hunter2  #!"),
        "spec.s3.secretAccessKey",
    ),
    "unknown_field": (
        bare("training:\n  epochz: 3  #!"),
        "spec.training.epochz",
    ),
    "freeze_both_counts": (
        bare("method:\n  name: freeze\n  freeze:\n    freezeFirstLayers: 2  #!\n    trainLastLayers: 2"),
        "spec.method.freeze.freezeFirstLayers",
    ),
    "freeze_without_section": (
        bare("method:  #!\n  name: freeze"),
        "spec.method.freeze",
    ),
    "adapter_export_of_full_training": (
        bare("method: {name: full}", "output:\n  uri: out\n  export: adapter  #!"),
        "spec.output.export",
    ),
    "ptv2_export_merged": (
        bare("method: {name: ptv2}", "output:\n  uri: out\n  export: merged  #!"),
        "spec.output.export",
    ),
    "ptv2_export_requantized": (
        bare("method: {name: ptv2}", "output:\n  uri: out\n  bits: 8  #!"),
        "spec.output.bits",
    ),
    "data_mixed_is_gone": (
        bare("data:\n  sources: [a.json, b.json]\n  mixed: false  #!"),
        "spec.data.mixed",
    ),
    "serving_adapter_names_twice": (
        bare("serving:\n  adapters:  #!\n    - {name: support, uri: s3://models/a1}\n    - {name: support, uri: s3://models/a2}"),
        "spec.serving.adapters",
    ),
    "serving_adapter_named_like_the_model": (
        bare("serving:\n  modelName: bot\n  adapters:  #!\n    - {name: bot, uri: s3://models/a1}"),
        "spec.serving.adapters",
    ),
    "serving_adapter_named_like_the_resource": (
        "apiVersion: glmtune.io/v1alpha1\nkind: GLMFineTune\nmetadata: {name: bot}\nspec:\n  "
        + "\n  ".join(bare("serving:\n  adapters:  #!\n    - {name: bot, uri: s3://models/a1}").splitlines()),
        "spec.serving.adapters",
    ),
    "serving_adapter_name_with_equals_sign": (
        bare("serving:\n  adapters:\n    - name: a=b  #!\n      uri: s3://models/a1"),
        "spec.serving.adapters[0].name",
    ),
    "serving_api_key_secret_without_name": (
        bare("serving:\n  apiKeySecret: {key: token}  #!"),
        "spec.serving.apiKeySecret.name",
    ),
    "adapter_export_requantized": (
        bare("output:\n  uri: out\n  export: adapter\n  bits: 4  #!"),
        "spec.output.bits",
    ),
    "watch_without_s3_source": (
        bare("data:\n  sources: [data/a.json]\n  watch: true  #!"),
        "spec.data.watch",
    ),
    "offload_params_without_zero3": (
        bare("training:\n  deepspeed:\n    stage: 2\n    offloadParams: true  #!"),
        "spec.training.deepspeed.offloadParams",
    ),
    "adalora_under_deepspeed": (
        bare("method:\n  name: adalora\n  adalora: {totalStep: 100}",
             "training:\n  deepspeed:  #!\n    stage: 2"),
        "spec.training.deepspeed",
    ),
    "adalora_under_zero0": (
        bare("method: {name: adalora}", "training:\n  maxSteps: 100\n  deepspeed: {stage: 0}  #!"),
        "spec.training.deepspeed",
    ),
    "generation_metrics_under_zero3": (
        bare("data: {sources: [a.json], evalSplit: 0.1}",
             "training:\n  deepspeed: {stage: 3}\n  evaluation:\n    generationMetrics: true  #!"),
        "spec.training.evaluation.generationMetrics",
    ),
    "generation_metrics_without_held_out_split": (
        bare("training:\n  evaluation: {everyEpoch: true, generationMetrics: true}  #!"),
        "spec.training.evaluation.generationMetrics",
    ),
    "generation_metrics_with_zero_eval_split": (
        bare("data:\n  sources: [a.json]\n  evalSplit: 0",
             "training:\n  evaluation:\n    generationMetrics: true  #!"),
        "spec.training.evaluation.generationMetrics",
    ),
    "ptv2_prefix_hidden_size_is_gone": (
        bare("method:\n  name: ptv2\n  ptv2:\n    prefixProjection: true\n    prefixHiddenSize: 512  #!"),
        "spec.method.ptv2.prefixHiddenSize",
    ),
    "zero_on_two_nodes_without_shared_work_dir": (
        bare("training:\n  deepspeed: {stage: 2}", "resources:  #!\n  nodes: 2\n  gpusPerNode: 8"),
        "spec.resources.workdirClaim",
    ),
    "work_dir_claim_not_a_dns_name": (
        bare("resources:\n  workdirClaim: Shared_Work  #!"),
        "spec.resources.workdirClaim",
    ),
    "memory_not_a_quantity": (
        bare("resources:\n  memory: lots  #!"),
        "spec.resources.memory",
    ),
    "more_processes_than_gpus": (
        bare("resources:\n  gpusPerNode: 2\n  nprocPerNode: 4  #!"),
        "spec.resources.nprocPerNode",
    ),
    "unknown_dtype": (
        "model:\n  uri: m\n  dtype: int3  #!\n" + BASE_DATA + "\n" + BASE_OUTPUT,
        "spec.model.dtype",
    ),
    "golden_prompt_with_two_expectations": (
        bare("serving:\n  promotion:\n    goldenPrompts:  #!\n      - messages: [{role: user, content: hi}]\n"
             "        expect: {exact: hello, contains: he}"),
        "spec.serving.promotion.goldenPrompts",
    ),
    "golden_prompt_without_expectation": (
        bare("serving:\n  promotion:\n    goldenPrompts:  #!\n      - messages: [{role: user, content: hi}]\n"
             "        expect: {}"),
        "spec.serving.promotion.goldenPrompts",
    ),
    "golden_prompt_ending_with_the_answer": (
        bare("serving:\n  promotion:\n    goldenPrompts:  #!\n      - messages: [{role: user, content: hi}, "
             "{role: assistant, content: hello}]\n        expect: {contains: a}"),
        "spec.serving.promotion.goldenPrompts",
    ),
    "golden_prompt_invalid_regex": (
        bare("serving:\n  promotion:\n    goldenPrompts:\n      - messages: [{role: user, content: hi}]\n"
             "        expect:\n          regex: '([a-z'  #!"),
        "spec.serving.promotion.goldenPrompts[0].expect.regex",
    ),
    "promotion_without_serving": (
        bare("serving:\n  enabled: false\n  promotion: {maxEvalLossIncrease: 0.1}  #!"),
        "spec.serving.promotion",
    ),
    "eval_gate_without_held_out_data": (
        bare("serving:\n  promotion: {maxEvalLossIncrease: 0.1}  #!"),
        "spec.serving.promotion.maxEvalLossIncrease",
    ),
    "canary_error_rate_above_one": (
        bare("serving:\n  promotion:\n    canary: {maxErrorRate: 1.5}  #!"),
        "spec.serving.promotion.canary.maxErrorRate",
    ),
    "wrong_kind": (
        "apiVersion: glmtune.io/v1alpha1\nkind: PyTorchJob  #!\nspec:\n  " + "\n  ".join(bare().splitlines()),
        "kind",
    ),
    "invalid_resource_name": (
        "apiVersion: glmtune.io/v1alpha1\nkind: GLMFineTune\nmetadata:\n  name: My_Job  #!\nspec:\n  "
        + "\n  ".join(bare().splitlines()),
        "metadata.name",
    ),
    "error_inside_full_object": (
        "apiVersion: glmtune.io/v1alpha1\nkind: GLMFineTune\nspec:\n  "
        + "\n  ".join(bare("method:\n  name: lora\n  ptv2: {preSeqLen: 8}  #!").splitlines()),
        "spec.method.ptv2",
    ),
    "missing_output": (
        "model: {uri: m}  #!\ndata: {sources: [a.json]}\n",
        "spec.output",
    ),
}
