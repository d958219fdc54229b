"""glmtune_trainer: everything that turns a user's data and a base model into a fine-tuned one.

`glmtune_trainer.data` turns question/answer files into tokenized, streamable records (`glmtune data ...`).
"""
