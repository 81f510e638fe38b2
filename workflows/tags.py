"""Every MLflow tag vitflow writes or searches by, in one table. Runs are found again by these tags (a
resumed stage finds its run, a cache hit finds its result, a search finds its trials), so a name is
spelled here once and imported everywhere else."""

# What a run is
STAGE = "vitflow.stage"  # preprocess | pretrain | finetune | finetune-trial | evaluate
STAGE_NAME = "vitflow.stage_name"  # the spec's stage key, e.g. preprocess:cifar10
RUN_NAME = "vitflow.run_name"  # a stage run's deterministic name: a rerun resumes the run of that name
WORKFLOW = "vitflow.workflow"  # a workflow execution's parent run: the spec's name
WORKDIR = "vitflow.workdir"
CONTINUES = "vitflow.continues"  # the killed execution a resumed one continues
REUSED_PREFIX = "vitflow.reused."  # + stage: the run whose cached result this execution reused

# The workflow's cache
STAGE_FINGERPRINT = "vitflow.stage_fingerprint"  # configuration, inputs and code of a stage
RESULT = "vitflow.result"  # the stage's result (JSON), reused while its fingerprint matches
CODE_VERSION = "vitflow.code_version"

# Lineage and search bookkeeping
DATASET_FINGERPRINT = "vitflow.dataset_fingerprint"
PRETRAINED = "vitflow.pretrained"
MODEL = "vitflow.model"
SPLIT = "vitflow.split"
SEARCH_RUN_ID = "vitflow.search_run_id"
TRIAL_ID = "vitflow.trial_id"
WEIGHTS = "vitflow.weights"  # which weights a logged model holds: raw (trained) or ema (their weight EMA)
STOPPED_EARLY = "vitflow.stopped_early"
ERROR = "vitflow.error"

# Jobs submitted to a cluster
COMMAND = "vitflow.command"
SPEC = "vitflow.spec"

PARENT_RUN = "mlflow.parentRunId"  # MLflow's own nesting tag: the UI draws the tree from it
