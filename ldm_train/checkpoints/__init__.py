"""Every checkpoint format of the project, in one place.

- ``compvis``: the CompVis latent-diffusion key layout (the one prefix table), reading any weights file once
  (safetensors or data-only torch files, local or fsspec), strict loading into our modules, safetensors export.
- ``first_stage``: first-stage (autoencoder) files: our export with its recorded architecture, released
  ``model.ckpt`` files, or the ``first_stage_model.*`` part of a whole LDM checkpoint.
- ``export``: the LDM trainer's per-checkpoint export (``model.safetensors``, ``model_ema.safetensors``,
  ``config.yaml``, ``tokenizer/``) and loading it back without DeepSpeed.
- ``diffusers_export`` / ``diffusers_import``: to diffusers' layout (a whole ``LDMTextToImagePipeline`` for text
  models) and back to the CompVis layout (``train.init_from=<diffusers folder>``); ``ldmbert``: our text encoder
  <-> diffusers' ``LDMBertModel``.
- ``safe_load``: ``torch.load(weights_only=True)`` for every torch file (a pickle that needs more is refused,
  naming the file), and the context that makes DeepSpeed's and torch-fidelity's own loads weights-only too.

Models stay plain ``nn.Module``s: nothing under ``ldm_train.models`` opens a file.
``python -m ldm_train.checkpoints PATH`` prints the groups and tensor counts of a checkpoint as JSON.
"""
