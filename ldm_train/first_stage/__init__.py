"""The first-stage (autoencoder) trainer: ``python -m ldm_train.train_autoencoder`` runs it.

- ``config``: the typed root config of ``conf/train_autoencoder.yaml`` (``AutoencoderAppConfig``);
- ``data``: the deterministic, resumable image stream and the held-out images;
- ``losses``: the paper's L1 + LPIPS + KL/codebook + patch-GAN objective;
- ``checkpoint``: resumable checkpoints (atomic, per-rank RNG);
- ``trainer``: the DDP ``Trainer`` and ``train(cfg)``.

First-stage weights I/O (export, load) is ``ldm_train.checkpoints.first_stage``.
"""
