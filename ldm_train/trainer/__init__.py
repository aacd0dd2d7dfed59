"""The LDM trainer: Hydra config -> DeepSpeed ZeRO engine over UNet + text encoder -> checkpoints + exports.

Modules: ``config`` (typed schema), ``derived`` (batch/lr/interval arithmetic, printed at start),
``ds_config`` (DeepSpeed JSON from conf/deepspeed + train), ``build`` (run dir, tokenizer, conditioning checks),
``setup`` (``TrainerSetup``: process group, data, scale factor, engine, EMA, resume, tracking, FID, banner),
``loop`` (the ``Trainer``: the micro-steps, each ``ldm_train/diffusion/step.py``'s ``training_loss``, and the
loop), ``outputs`` (checkpoints, sample grids, in-training FID, the run summary), ``checkpoint`` (save/resume,
universal conversion at another world size), ``init_from``, ``pinned`` (settings a resume may not change),
``scale_factor``, ``samples`` (sample grids), ``fid`` (in-training FID), ``guard`` (non-finite steps), ``sweep``.
The model is ``ldm_train/models/ldm.py`` (``LatentDiffusion``), its export ``ldm_train/checkpoints/export.py``.
"""
