"""End-to-end studies that chain the stages as a user would, each one command: the quickstart, the f-sweep, the
first-stage family, the Fashion-MNIST reference run against diffusers' pixel DDPM, and the sweep report.

They run the stage commands (data prep, ``ldm_train.train_autoencoder``, ``data_prep.encode``, ``ldm_train.train``,
``eval.run``) as subprocesses and collect their outputs; the metrics themselves live in ``eval``.
"""
