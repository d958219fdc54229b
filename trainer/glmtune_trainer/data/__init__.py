"""Q/A data → validated, tokenized, streamable training records (`glmtune data build|stats|show`).

formats (parse + validate) → sources (files, globs, s3://) → encode (templates + strategies) → packing →
parallel (workers) → records (on-disk shards) → build (manifest, hash, cache) → dataset / collate (torch).
"""
