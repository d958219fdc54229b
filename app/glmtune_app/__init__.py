"""glmtune_app: the application layer — the `glmtune` command registry and `glmtune run`.

It sits above every component (core `glmtune`, `glmtune_trainer`, `glmtune_inference`, `glmtune_operator`)
and is the only package allowed to name them all; the core names none of them.
"""
