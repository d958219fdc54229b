"""glmtune's Kubernetes operator: GLMFineTune → PyTorchJob → export in S3 → health-gated inference rollout.

Torch-free: the operator image carries kopf, the kubernetes client and boto3 only. `glmtune operator`
runs it (`glmtune_operator.cli`); the kopf handlers live in `glmtune_operator.handlers`.
"""
