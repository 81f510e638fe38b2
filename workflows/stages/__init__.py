"""The stages of a workflow, one module each: ``preprocess``, ``pretrain``, ``finetune`` (the search and the
registration of its best model), ``evaluate``, and ``preflight`` (the checks before any of them). Each is a
function from typed settings to a frozen result (``run_stage(section, StageInputs) -> StageResult`` for the
runner); a stage imports compute, tracking and configs, never another stage."""
