"""The LDM trainer: Hydra config -> DeepSpeed ZeRO engine over UNet + text encoder -> checkpoints + exports.

Modules: ``config`` (typed schema), ``derived`` (batch/lr/interval arithmetic, printed at start),
``ds_config`` (DeepSpeed JSON from conf/deepspeed + train), ``model`` (LatentDiffusion: one nn.Module),
``build`` (run dir, tokenizer, model), ``loop`` (the Trainer), ``checkpoint`` (save/resume, universal
conversion at another world size), ``export`` (safetensors in the CompVis layout; ``load_export`` for eval),
``samples`` (sample grids), ``preemption`` (signals, SLURM requeue), ``guard`` (non-finite steps).
"""
